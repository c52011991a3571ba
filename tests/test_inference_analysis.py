"""routelab.inference.analyze / sweep against hand loops, and `routelab analyze` / `routelab sweep` end to end on a
tiny saved model (real files, real CLI, exit codes and one-line errors)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import routelab
from routelab.cli import main
from routelab.inference.analysis import analyze
from routelab.inference.sweep import sweep
from routelab.models import ModelConfig, MoETransformerLM

E = 4


def _lm(**router_options) -> MoETransformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, d_ff=32, num_experts=E,
                      router_options=router_options, max_seq_len=64)
    return MoETransformerLM(cfg).eval()


def _domains():
    g = torch.Generator().manual_seed(7)
    return {"a": torch.randint(0, 25, (3, 20), generator=g), "b": torch.randint(25, 50, (3, 20), generator=g)}


def test_analyze_matches_hand_counts():
    model, domains = _lm(), _domains()
    result = analyze(model, domains, batch_size=2, segment_lengths=(1, 4))
    counts = {d: [torch.zeros(E, dtype=torch.float64) for _ in range(2)] for d in domains}
    top1 = [torch.zeros(E) for _ in range(2)]
    tok_counts = [{} for _ in range(2)]
    with torch.no_grad():
        for d, ids in domains.items():
            for row in ids:  # one sequence at a time: routing is per token, so batching must not matter
                model(row[None])
                for j, layer in enumerate(model.moe_layers):
                    dense = layer.last_decision.dense_weights()
                    counts[d][j] += (dense > 0).sum(0).double()
                    top1[j] += torch.bincount(dense.argmax(-1), minlength=E).float()
                    for t in range(row.numel()):
                        for e in torch.nonzero(dense[t] > 0).flatten().tolist():
                            key = (e, int(row[t]))
                            tok_counts[j][key] = tok_counts[j].get(key, 0) + 1
    for j, L in enumerate(result["layers"]):
        total = counts["a"][j] + counts["b"][j]
        assert L["load"] == total.tolist()
        assert L["experts_per_token"] == pytest.approx(2.0)
        share = total / total.sum()
        assert L["load_entropy"] == pytest.approx(float(-(share * share.log()).sum() / math.log(E)))
        assert L["max_over_mean"] == pytest.approx(float(total.max() / total.mean()))
        assert L["congestion"] == pytest.approx(float(top1[j][total.argmax()] / top1[j].sum()))
        va, vb = (counts[d][j] / counts[d][j].sum() for d in ("a", "b"))
        assert L["domain_share"]["a"] == pytest.approx(va.tolist())
        assert L["domain_cosine"][0][1] == pytest.approx(float(va @ vb / (va.norm() * vb.norm())))
        assert L["srp"]["1"] == pytest.approx(1.0) and 0 < L["srp"]["4"] <= 1
        assert 0 < L["sch"]["4"] <= 1 and L["cache_size"] == 4
        for e, toks in enumerate(L["top_tokens"]):
            for t in toks:
                assert tok_counts[j][(e, t["id"])] == t["count"]
            best = max((n for (ee, _), n in tok_counts[j].items() if ee == e), default=0)
            assert not toks or toks[0]["count"] == best


def test_sweep_rows_against_a_hand_loop():
    model, domains = _lm(), _domains()
    result = sweep(model, domains, k=[1, 2], top_p=[0.5], min_weight_ratio=[0.9], skip=[0.25], batch_size=2)
    rows = {(r["kind"], r["value"]): r for r in result["rows"]}
    with torch.no_grad():
        losses = {d: torch.nn.functional.cross_entropy(model(ids)[0][:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1),
                                                       reduction="sum").item() / (ids[:, 1:].numel())
                  for d, ids in domains.items()}
    trained = rows[("trained", None)]
    for d in domains:
        assert trained["ppl_by_domain"][d] == pytest.approx(math.exp(losses[d]), rel=1e-5)
    assert trained["ppl"] == pytest.approx(math.exp(sum(losses.values()) / 2), rel=1e-5)
    assert trained["active_flops"] == 1 and rows[("k", 2)]["ppl"] == pytest.approx(trained["ppl"], rel=1e-6)
    assert rows[("k", 1)]["active_flops"] == pytest.approx(0.5) and rows[("k", 1)]["experts_per_token"] == 1
    assert rows[("min_weight_ratio", 0.9)]["active_flops"] < 1
    assert rows[("skip", 0.25)]["active_flops"] == pytest.approx(0.75, abs=0.06)
    assert rows[("skip", 0.25)]["calibration"]["calibration_skip"] == pytest.approx(0.25, abs=0.01)
    assert all(not layer.router._forward_hooks for layer in model.moe_layers)  # every override removed
    with pytest.raises(ValueError, match="top_p must be a number"):
        sweep(model, domains, top_p=[1.5])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from routelab.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("cli")
    prose = " ".join(f"the {w} of a {v} is kept here" for w in ("cat", "tree", "list", "river") for v in range(40))
    code = "\n".join(f"def f{i}(x):\n    return x * {i} + len([x])" for i in range(60))
    (root / "prose.txt").write_text(prose)
    (root / "code.txt").write_text(code)
    tok = train_tokenizer([prose, code], vocab_size=300)
    torch.manual_seed(0)
    model = MoETransformerLM(ModelConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=2, n_heads=2,
                                         d_ff=32, num_experts=4, max_seq_len=64))
    routelab.save_model(model, tok, root / "model")
    return root


def test_cli_analyze_and_sweep_end_to_end(saved, capsys):
    data = [str(saved / "prose.txt"), str(saved / "code.txt")]
    common = ["--data", *data, "--seq-len", "16", "--windows", "3"]
    assert main(["analyze", str(saved / "model"), *common, "--out", str(saved / "an")]) == 0
    for name in ("report.md", "analysis.json", "expert_load.png", "domain_share.png", "domain_similarity.png",
                 "consistency.png"):
        assert (saved / "an" / name).stat().st_size > 0
    result = json.loads((saved / "an" / "analysis.json").read_text())
    assert result["domains"] == ["prose", "code"] and len(result["layers"]) == 2
    assert "SRP m=4" in (saved / "an" / "report.md").read_text()
    (saved / "an" / "notes.txt").write_text("mine")
    assert main(["analyze", str(saved / "model"), *common, "--out", str(saved / "an")]) == 0  # its own folder: ok
    assert (saved / "an" / "notes.txt").read_text() == "mine"  # a user's file beside the report is left alone
    foreign = saved / "foreign-ok"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("theirs")
    assert main(["analyze", str(saved / "model"), *common, "--out", str(foreign), "--overwrite"]) == 0
    assert (foreign / "keep.txt").read_text() == "theirs" and (foreign / "report.md").is_file()

    assert main(["sweep", str(saved / "model"), *common, "--k", "1,2", "--skip", "0.3", "--out",
                 str(saved / "sw")]) == 0
    table = (saved / "sw" / "report.md").read_text()
    assert "| k=1 | 1.000 | 0.500 |" in table and "skip=0.3" in table
    assert (saved / "sw" / "sweep.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["sweep", "MODEL", "--k", "0"], "--k values must be in [1, num_experts=4]"),
    (["sweep", "MODEL", "--top-p", "x"], "--top-p must be comma-separated numbers"),
    (["sweep", "MODEL", "--skip", "1"], "--skip values must be in [0, 1)"),
    (["analyze", "MODEL", "--seq-len", "65"], "exceeds the model's max_seq_len 64"),
    (["analyze", "MODEL", "--segment-lengths", "0"], "--segment-lengths must be integers >= 1"),
    (["analyze", "NOWHERE"], "not a model folder"),
    (["analyze", "MODEL", "--out", "FOREIGN"], "is not empty and is not a routelab run"),
    (["sweep", "MODEL", "--out", "ANALYSIS"], "holds a `routelab analyze` run"),
    (["sweep", "MODEL", "--data", "MISSING"], "data file not found"),
])  # fmt: skip
def test_cli_bad_input(saved, capsys, args, message):
    foreign = saved / "foreign"
    foreign.mkdir(exist_ok=True)
    (foreign / "keep.txt").write_text("not routelab's")
    subst = {"MODEL": str(saved / "model"), "NOWHERE": str(saved / "nowhere"), "FOREIGN": str(foreign),
             "MISSING": str(saved / "missing.txt"), "ANALYSIS": str(saved / "an")}
    if "ANALYSIS" in args and not (saved / "an").exists():  # when run alone: make the analyze report first
        assert main(["analyze", str(saved / "model"), "--data", str(saved / "prose.txt"), "--seq-len", "16",
                     "--windows", "2", "--out", str(saved / "an")]) == 0
    argv = [subst.get(a, a) for a in args]
    if "--data" not in argv:
        argv += ["--data", str(saved / "prose.txt")]
    if "--out" not in argv:
        argv += ["--out", str(saved / "bad-out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert (foreign / "keep.txt").read_text() == "not routelab's"
    assert not (saved / "bad-out").exists()

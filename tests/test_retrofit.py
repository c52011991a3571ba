"""Retrofitted skip / execute / repeat routers (Dr.LLM, FiRST): execution, exact search, focal loss, frozen base,
honest (prompt-only) decisions, compute accounting, files and the `routelab retrofit` command."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import routelab
from routelab.cli import main
from routelab.inference.retrofit import (
    LayerRouters,
    beam_search_plans,
    RouterConfig,
    class_weights,
    focal_loss,
    load_routers,
    plan_losses,
    prompt_features,
    retrofit,
    route,
    run_plans,
    save_routers,
    search_plans,
    train_routers,
)
from routelab.models.transformer import ModelConfig, MoETransformerLM


def tiny_model(n_layers=3, moe_every=1, router="topk", options=None, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=48, d_model=16, n_layers=n_layers, n_heads=2, d_ff=16, num_experts=4,
                      moe_every=moe_every, max_seq_len=32, router=router, router_options=options or {"k": 2})
    model = MoETransformerLM(cfg).to(dtype).eval()
    with torch.no_grad():  # trained-looking scales: plans then differ clearly in loss
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    return model


def hand_logits(model, ids_L, plan):
    """The reference: one sequence, a plain loop running block i plan[i] times through the modules' own forwards."""
    x = model.embed(ids_L[None])
    for i, block in enumerate(model.blocks):
        for _ in range(plan[i]):
            x = x + block.attn(block.attn_norm(x), model.rope_cos, model.rope_sin)
            x = x + block.ffn(block.ffn_norm(x))
    return F.linear(model.final_norm(x), model.embed.weight)[0]


def hand_continuation_loss(model, ids_L, plan, P):
    logits = hand_logits(model, ids_L, plan)
    return float(F.cross_entropy(logits[P - 1 : -1], ids_L[P:]))


def windows(n=5, L=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 48, (n, L), generator=g)


@torch.no_grad()
def test_plan_of_all_ones_is_the_model_forward_exactly():
    for moe_every in (1, 2):
        model = tiny_model(moe_every=moe_every, dtype=torch.float32)
        ids = windows()
        logits, run = run_plans(model, ids, [1, 1, 1])
        assert torch.equal(logits, model(ids)[0])
        assert run.runs_BN.tolist() == [[1, 1, 1]] * ids.shape[0]


@pytest.mark.parametrize("extra", [
    {"chain_iterations": 2},
    {"expert_pool": "unipool"},
    {"expert_pool": "rexmoe", "reuse_window": 1},
    {"router": "null_experts", "router_options": {"num_null_experts": 1, "k": 1}, "num_experts": 2,
     "expert_widths": [8, 32]},
])
@torch.no_grad()
def test_plan_of_all_ones_is_the_model_forward_for_every_model_option(extra):
    torch.manual_seed(0)
    cfg = ModelConfig(**{"vocab_size": 48, "d_model": 16, "n_layers": 3, "n_heads": 2, "d_ff": 16, "num_experts": 4,
                         "max_seq_len": 32, "router": "topk", "router_options": {"k": 2}, **extra})
    model = MoETransformerLM(cfg).eval()
    ids = windows()
    assert torch.equal(run_plans(model, ids, [1, 1, 1])[0], model(ids)[0])
    _, once = run_plans(model, ids, [1, 1, 1])
    _, twice = run_plans(model, ids, [2, 2, 2])
    assert once.expert_units > 0 and twice.expert_units > once.expert_units  # repeats spend routed experts again


@torch.no_grad()
def test_skip_and_repeat_per_sequence_equal_a_hand_loop():
    model = tiny_model(moe_every=2)
    ids = windows(n=4)
    plans = [[2, 1, 0], [0, 2, 2], [1, 0, 1], [2, 2, 2]]
    logits, run = run_plans(model, ids, plans)  # every sequence its own plan: sub-batches per block run
    for b, plan in enumerate(plans):
        torch.testing.assert_close(logits[b], hand_logits(model, ids[b], plan), rtol=0, atol=1e-10)
    assert run.runs_BN.tolist() == plans
    # repeat really runs twice: it differs from execute, and skip leaves the stream untouched
    assert not torch.allclose(run_plans(model, ids[:1], [2, 1, 1])[0], run_plans(model, ids[:1], [1, 1, 1])[0])
    x = model.embed(ids[:1])
    torch.testing.assert_close(run_plans(model, ids[:1], [0, 0, 0])[0], F.linear(model.final_norm(x), model.embed.weight))


def test_exhaustive_search_equals_brute_force():
    model = tiny_model()
    ids, P = windows(n=3), 4
    plans, losses = plan_losses(model, ids, prompt_len=P, budget=1.0, batch_size=2)
    assert len(plans) == 17  # {0,1,2}^3 with at most 3 runs, by hand: 1 + 3 + 6 + 7
    assert set(plans) == {p for p in itertools.product(range(3), repeat=3) if sum(p) <= 3}
    with torch.no_grad():
        brute = torch.tensor([[hand_continuation_loss(model, ids[n], p, P) for p in plans] for n in range(3)],
                             dtype=torch.float64)
    torch.testing.assert_close(losses, brute, rtol=0, atol=1e-9)
    best = search_plans(plans, losses)
    for n in range(3):
        assert tuple(best[n].tolist()) == min(plans, key=lambda p: (brute[n, plans.index(p)].item(), sum(p)))
    # a tighter budget searches exactly the cheaper plans, with the same losses
    cheap, cheap_losses = plan_losses(model, ids, prompt_len=P, budget=0.5, batch_size=8)
    assert cheap == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0)]
    torch.testing.assert_close(cheap_losses, brute[:, [plans.index(p) for p in cheap]], rtol=0, atol=1e-9)


def test_beam_search_is_exact_when_wide_and_scores_its_plans_exactly_when_narrow():
    model = tiny_model()
    ids, P = windows(n=5), 4
    for budget in (0.5, 1.0, 2.0):
        plans, losses = plan_losses(model, ids, prompt_len=P, budget=budget)
        wide, wide_losses = beam_search_plans(model, ids, prompt_len=P, budget=budget, beam=27, batch_size=2)
        assert torch.equal(wide, search_plans(plans, losses))
        torch.testing.assert_close(wide_losses, losses.min(1).values, rtol=0, atol=1e-12)
        narrow, narrow_losses = beam_search_plans(model, ids, prompt_len=P, budget=budget, beam=1, batch_size=3)
        cap = int(budget * 3)
        fill = tuple(1 if i < cap else 0 for i in range(3))  # execute blocks in order while the budget lasts
        with torch.no_grad():
            for n in range(5):
                plan = tuple(narrow[n].tolist())
                assert sum(plan) <= cap
                assert narrow_losses[n].item() == pytest.approx(hand_continuation_loss(model, ids[n], plan, P), abs=1e-9)
                assert narrow_losses[n].item() <= hand_continuation_loss(model, ids[n], fill, P) + 1e-9


def test_focal_loss_equals_a_hand_computation_and_cross_entropy_at_gamma_0():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    target = torch.tensor([0, 2, 2])
    w = torch.tensor([1.0, 2.0, 3.0])
    expected_num, expected_den = 0.0, 0.0
    for row, y in zip(logits.tolist(), target.tolist()):
        p = math.exp(row[y]) / sum(math.exp(v) for v in row)
        expected_num += w[y].item() * (1 - p) ** 2 * -math.log(p)
        expected_den += w[y].item()
    assert focal_loss(logits, target, gamma=2.0, weight_C=w).item() == pytest.approx(expected_num / expected_den, rel=1e-6)
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0, weight_C=w),
                               F.cross_entropy(logits.float(), target, weight=w), rtol=1e-6, atol=0)
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0), F.cross_entropy(logits.float(), target))
    # class balancing by hand: counts 3, 1, 0 of 4 → 4/(2·3), 4/(2·1), 0
    torch.testing.assert_close(class_weights(torch.tensor([0, 0, 0, 1])), torch.tensor([2 / 3, 2.0, 0.0]))


def test_retrofit_leaves_the_base_model_unchanged_and_no_gradient_reaches_it():
    model = tiny_model(dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(True)
    before = copy.deepcopy(model.state_dict())
    routers, _ = retrofit(model, windows(n=6, seed=2), windows(n=4, seed=3), budget=1.0, prompt_len=4,
                               pool_windows=2, steps=5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # flags restored, no .grad
    # training moves the routers, not the model
    cfg = routers.config
    fresh = LayerRouters(cfg)
    feats = prompt_features(model, fresh, windows(n=6, seed=2), torch.ones(6, 3, dtype=torch.long))
    start = copy.deepcopy(fresh.state_dict())
    train_routers(fresh, feats, torch.tensor([[1, 0, 2]] * 3 + [[1, 2, 0]] * 3), steps=3)
    assert any(not torch.equal(start[k], v) for k, v in fresh.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@torch.no_grad()
def test_router_decisions_read_only_the_prompt_and_respect_the_budget():
    model = tiny_model(dtype=torch.float32)
    torch.manual_seed(0)
    routers = LayerRouters(RouterConfig(d_model=16, n_layers=3, hidden=8, pool_windows=2, prompt_len=4, budget=2.0))
    for mlp in routers.mlps:
        mlp[0].weight.mul_(20.0)
    ids = windows(n=8, seed=4)
    changed = ids.clone()
    changed[:, 4:] = (changed[:, 4:] + 7) % 48  # every token after the prompt differs
    _, run_a = route(model, routers, ids)
    _, run_b = route(model, routers, changed)
    assert torch.equal(run_a.runs_BN, run_b.runs_BN)
    assert len({tuple(r) for r in run_a.runs_BN.tolist()}) > 1  # the routers do react to their input...
    changed_prompt = ids.clone()
    changed_prompt[:, :4] = (changed_prompt[:, :4] + 7) % 48
    assert not torch.equal(route(model, routers, changed_prompt)[1].runs_BN, run_a.runs_BN)  # ...to the prompt
    # every router wants "repeat": under budget 0.5 of 3 blocks (1 run) the plan is clipped to (1, 0, 0)
    for mlp in routers.mlps:
        mlp[2].bias.copy_(torch.tensor([0.0, 0.0, 1e4]))
    routers.config = dataclasses.replace(routers.config, budget=0.5)
    _, run = route(model, routers, ids)
    assert run.runs_BN.tolist() == [[1, 0, 0]] * 8
    routers.config = dataclasses.replace(routers.config, budget=2.0)
    assert route(model, routers, ids)[1].runs_BN.tolist() == [[2, 2, 2]] * 8


@torch.no_grad()
def test_compute_accounting_counts_skipped_and_repeated_blocks_by_hand():
    model = tiny_model(n_layers=2, moe_every=2)  # block 0 dense, block 1 MoE with top-2
    ids = windows(n=2, L=10)
    tokens = 10
    _, full = run_plans(model, ids, [1, 1])
    assert full.expert_units == 2 * 2 * tokens  # 2 sequences × 2 experts per token × 10 tokens, one MoE run
    _, run = run_plans(model, ids, [[2, 2], [0, 1]])
    assert run.expert_units == (2 + 1) * 2 * tokens  # the MoE block ran twice for sequence 0, once for sequence 1
    assert run.runs_BN.sum().item() == 4 + 1


def test_report_compute_columns_match_a_hand_count_from_the_plans():
    model = tiny_model(dtype=torch.float32)  # top-2 in every block: expert FLOPs follow block runs exactly
    _, report = retrofit(model, windows(n=8, seed=5), windows(n=6, seed=6), budget=1.0, prompt_len=4,
                         pool_windows=2, steps=20)
    rows = report["rows"]
    assert rows["full"]["block_runs_fraction"] == 1.0 and rows["full"]["expert_flops_fraction"] == 1.0
    assert rows["static"]["block_runs_fraction"] == pytest.approx(sum(rows["static"]["plan"]) / 3)
    for name in ("oracle", "routers", "static"):
        shares = rows[name]["action_shares_by_block"]
        by_hand = sum(a * shares[i][a] for i in range(3) for a in range(3)) / 3
        assert rows[name]["block_runs_fraction"] == pytest.approx(by_hand)
        assert rows[name]["expert_flops_fraction"] == pytest.approx(by_hand)
        assert rows[name]["block_runs_fraction"] <= 1.0 + 1e-12  # the budget holds for every kind of plan
    assert rows["oracle"]["loss"] <= min(rows["full"]["loss"], rows["static"]["loss"]) + 1e-9  # per-window argmin


def test_save_and_load_routers_round_trip(tmp_path):
    routers = LayerRouters(RouterConfig(d_model=16, n_layers=3, hidden=8, pool_windows=2, prompt_len=4, budget=1.0))
    save_routers(routers, tmp_path)
    loaded = load_routers(tmp_path)
    assert loaded.config == routers.config
    x = torch.randn(3, 10, 16)
    torch.testing.assert_close(loaded.logits(1, x), routers.logits(1, x), rtol=0, atol=0)
    assert json.loads((tmp_path / "routers.json").read_text())["config"]["prompt_len"] == 4


def test_bad_input_is_refused_with_the_option_named():
    model = tiny_model()
    ids = windows()
    for budget in (0, -1, 2.5, float("nan")):
        with pytest.raises(ValueError, match="budget"):
            plan_losses(model, ids, prompt_len=4, budget=budget)
    with pytest.raises(ValueError, match="prompt_len"):
        plan_losses(model, ids, prompt_len=12, budget=1.0)
    with pytest.raises(ValueError, match="max_plans"):
        plan_losses(model, ids, prompt_len=4, budget=2.0, max_plans=10)
    with pytest.raises(ValueError, match="pool_windows"):
        RouterConfig(d_model=16, n_layers=3, hidden=8, pool_windows=5, prompt_len=4, budget=1.0).validate()
    with pytest.raises(ValueError, match="plans must hold 3"):
        run_plans(model, ids, [1, 3, 1])
    with pytest.raises(ValueError, match="gamma"):
        focal_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), gamma=-1.0)
    recurrent = tiny_model(router="recurrent", options={"k": 2, "hidden": 8}, dtype=torch.float32)
    with pytest.raises(ValueError, match="state"):
        run_plans(recurrent, ids, [1, 1, 1])
    torch.manual_seed(0)
    mod = MoETransformerLM(dataclasses.replace(model.config, mod_capacity=0.5)).double()
    with pytest.raises(ValueError, match="Mixture-of-Depths"):
        run_plans(mod, ids, [1, 1, 1])


# ---------------------------------------------------------------------------------------------------------------
# the command, end to end on a model trained for a few steps

CONFIG = """\
data: {vocab_size: 320, max_chars: 0}
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 32, num_experts: 4, router: topk, router_options: {k: 2}}
train: {steps: 6, batch_size: 4, seq_len: 32, warmup: 2, eval_every: 3, checkpoint_every: 3, eval_windows: 2,
        eval_batch_size: 4, seed: 3}
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("retrofit")
    prose, code = root / "prose.txt", root / "code.txt"
    prose.write_text("".join(f"The {w} sat on the mat number {i}, and then it slept.\n"
                             for i, w in enumerate(["cat", "dog", "bird"] * 60)))
    code.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)))
    (root / "tiny.yaml").write_text(CONFIG)
    argv = ["train", "--config", str(root / "tiny.yaml"), "--data", str(prose), str(code), "--out",
            str(root / "run"), "--quiet"]
    assert main(argv) == 0
    return {"model": root / "run" / "model", "prose": prose, "code": code}


def _args(trained, out, *more):
    return ["retrofit", str(trained["model"]), "--data", str(trained["prose"]), str(trained["code"]), "--out",
            str(out), "--seq-len", "24", "--prompt-len", "8", "--pool-windows", "2", "--train-windows", "6",
            "--val-windows", "4", "--steps", "10", *more]


def test_cli_end_to_end_writes_routers_and_a_report_whose_numbers_hold(trained, tmp_path, capsys):
    out = tmp_path / "rf"
    assert main(_args(trained, out, "--budget", "1.0")) == 0
    assert {p.name for p in out.iterdir()} >= {"routers.safetensors", "routers.json", "retrofit.json", "report.md"}
    report = json.loads((out / "retrofit.json").read_text())
    assert report["plans_searched"] == 6 and report["max_block_runs"] == 2  # {0,1,2}^2 with ≤ 2 runs, by hand
    # the full model's loss against a plain forward over the same validation windows (even-numbered, per domain)
    model, tokenizer = routelab.load_model(trained["model"])
    from routelab.inference.windows import text_windows

    domains = text_windows([str(trained["prose"]), str(trained["code"])], tokenizer, seq_len=24, max_windows=6)
    val = torch.cat([ev[:4] for ev, _ in domains.values()])
    with torch.no_grad():
        logits = model(val)[0][:, 7:-1]
        plain = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), val[:, 8:].reshape(-1)).item()
        routers = load_routers(out)
        _, run = route(model, routers, val)
    assert report["rows"]["full"]["loss"] == pytest.approx(plain, rel=1e-5)
    assert report["rows"]["routers"]["block_runs_fraction"] == pytest.approx(run.runs_BN.sum().item() / (2 * len(val)))
    assert "| full model" in (out / "report.md").read_text()
    assert main(_args(trained, out, "--budget", "0.5")) == 0  # a rerun replaces its own run
    assert json.loads((out / "retrofit.json").read_text())["plans_searched"] == 3
    assert main(_args(trained, out, "--budget", "2", "--max-plans", "5", "--beam", "2")) == 0  # 9 plans > 5: beam
    report = json.loads((out / "retrofit.json").read_text())
    assert report["search"] == "beam 2" and report["plans_searched"] is None
    assert report["rows"]["oracle"]["loss"] <= report["rows"]["full"]["loss"] + 1e-9  # all ones is scored (the fill of "execute block 0")


def _fails(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_cli_bad_input_is_one_line_before_any_work(trained, tmp_path, capsys):
    out = tmp_path / "never"
    _fails(capsys, _args(trained, out, "--budget", "0"), "--budget must be a number > 0.0")
    _fails(capsys, _args(trained, out, "--budget", "2.5"), "--budget must be a number")
    _fails(capsys, _args(trained, out, "--prompt-len", "24"), "--prompt-len 24 must be less than --seq-len 24")
    _fails(capsys, _args(trained, out, "--pool-windows", "9"), "--pool-windows 9 must be <= --prompt-len 8")
    _fails(capsys, _args(trained, out, "--steps", "0"), "--steps must be an integer >= 1")
    _fails(capsys, _args(trained, out, "--gamma", "-1"), "--gamma must be a number >= 0.0")
    _fails(capsys, _args(trained, out, "--seq-len", "999"), "exceeds the model's max_seq_len")
    _fails(capsys, _args(trained, out, "--beam", "0"), "--beam must be an integer >= 1")
    _fails(capsys, ["retrofit", str(tmp_path / "nope"), "--out", str(out)], "nope")
    assert not out.exists()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    _fails(capsys, _args(trained, precious), "is not empty and is not a routelab run")
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]

"""`routelab train`, `eval` and `generate`: trained models as folders, end to end through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import routelab
from routelab.cli import main
from routelab.commands.train import TRAIN_PRESETS, resolve_train, run_train
from routelab.compare import load_preset

CONFIG = """\
data: {vocab_size: 320, max_chars: 0}
model: {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 32, num_experts: 4, router: topk, router_options: {k: 2}}
train: {steps: 8, batch_size: 4, seq_len: 32, warmup: 2, eval_every: 4, checkpoint_every: 4, eval_windows: 2,
        eval_batch_size: 4, seed: 3}
"""


class Stop(Exception):
    pass


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ROUTELAB_CACHE", str(tmp_path_factory.getbasetemp() / "routelab-cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    prose, code = root / "prose.txt", root / "code.txt"
    prose.write_text("".join(f"The {w} sat on the mat number {i}, and then it slept.\n"
                             for i, w in enumerate(["cat", "dog", "bird"] * 100)))
    code.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300)))
    config = root / "tiny.yaml"
    config.write_text(CONFIG)
    return {"prose": prose, "code": code, "config": config}


def _train_args(files, out, *more):
    return ["train", "--config", str(files["config"]), "--data", str(files["prose"]), str(files["code"]),
            "--out", str(out), "--quiet", *more]


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "m"
    assert main(_train_args(files, out)) == 0
    return out


def test_train_writes_a_loadable_model_folder(trained):
    assert sorted(p.name for p in (trained / "model").iterdir()) == [".routelab-run.json",
        "config.json", "model.safetensors", "tokenizer.json", "training.json"]
    model, tokenizer = routelab.load_model(trained / "model")
    assert model.config.router == "topk" and model.config.d_model == 32 and not model.training
    assert model.config.vocab_size == tokenizer.get_vocab_size()
    training = json.loads((trained / "model" / "training.json").read_text())
    assert training["config"]["train"]["steps"] == 8
    assert [d["name"] for d in training["data"]["domains"]] == ["prose", "code"]
    assert math.isfinite(training["final"]["val_loss"])


def test_killed_and_resumed_train_equals_uninterrupted(files, trained, tmp_path):
    cfg = resolve_train(config_file=files["config"], data_files=[str(files["prose"]), str(files["code"])])

    def kill_at_step_6(step, record):
        if step == 6:
            raise Stop  # the last checkpoint is at step 4

    with pytest.raises(Stop):
        run_train(cfg, out_dir=tmp_path / "cut", quiet=True, on_step=kill_at_step_6)
    assert not (tmp_path / "cut" / "model" / "model.safetensors").exists()  # no model from an unfinished run
    assert main(_train_args(files, tmp_path / "cut", "--resume")) == 0
    want = load_file(str(trained / "model" / "model.safetensors"))
    got = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_train_presets_build_on_compare():
    small = resolve_train(preset="small")
    default = load_preset("default")
    assert {k: small["model"][k] for k in default["model"]} == default["model"]
    assert small["train"] == {**default["train"], **small["train"]} and small["train"]["steps"] == 250
    assert [(v["router"], v["options"]) for v in small["variants"]] == [("topk", {"k": 2})]
    tiny = resolve_train(preset="tiny")
    assert tiny["train"]["checkpoint_every"] > 0 and set(TRAIN_PRESETS) == {"tiny", "small"}


def test_eval_numbers_equal_a_hand_loop(trained, files, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(trained / "model"), "--data", str(files["prose"]), str(files["code"]), "--json",
                 str(out), "--seq-len", "16", "--max-windows", "9", "--batch-size", "4"]) == 0
    table = capsys.readouterr().out
    assert "prose.txt" in table and "code.txt" in table
    report = json.loads(out.read_text())
    model, tokenizer = routelab.load_model(trained / "model")
    for path, got in zip((files["prose"], files["code"]), report["files"]):
        ids = tokenizer.encode(path.read_text(), add_special_tokens=False).ids
        loss_sum, count = 0.0, 0
        load = [torch.zeros(4, dtype=torch.float64) for _ in model.moe_layers]
        assignments = [0] * len(model.moe_layers)
        with torch.no_grad():
            for w in range(9):  # window w predicts tokens 16w+1 .. 16w+16, one window at a time
                x = torch.tensor([ids[16 * w : 16 * w + 16]])
                y = torch.tensor([ids[16 * w + 1 : 16 * w + 17]])
                logits = model(x)[0]
                loss_sum += F.cross_entropy(logits[0].double(), y[0], reduction="sum").item()
                count += 16
                for j, layer in enumerate(model.moe_layers):
                    d = layer.last_decision
                    load[j] += torch.bincount(d.expert_index, minlength=4).double()
                    assignments[j] += d.expert_index.numel()
        assert got["tokens"] == count == 9 * 16 and got["windows"] == 9
        assert got["loss"] == pytest.approx(loss_sum / count, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(loss_sum / count), rel=1e-5)
        assert got["experts_per_token_by_layer"] == pytest.approx([a / count for a in assignments])
        assert got["load_by_layer"] == [l.tolist() for l in load]
        assert got["imbalance_max_over_mean_by_layer"] == pytest.approx([float(l.max() / l.mean()) for l in load])


def test_generate_prints_the_greedy_continuation(trained, capsys):
    model, tokenizer = routelab.load_model(trained / "model")
    prompts = ["def f1", "The cat sat on"]
    assert main(["generate", str(trained / "model"), "--prompt", prompts[0], "--prompt", prompts[1],
                 "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    for text in prompts:  # the hand loop: full recompute, argmax, per prompt alone
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        new = []
        with torch.no_grad():
            for _ in range(6):
                new.append(int(model(torch.tensor([ids + new]))[0][0, -1].argmax()))
        eos = tokenizer.token_to_id("<|endoftext|>")
        new = new[: new.index(eos)] if eos in new else new
        assert text + tokenizer.decode(new, skip_special_tokens=False) in printed
    assert main(["generate", str(trained / "model"), "--prompt", "def", "--temperature", "0.9", "--top-k", "5",
                 "--seed", "1", "--max-new-tokens", "5"]) == 0
    first = capsys.readouterr().out
    main(["generate", str(trained / "model"), "--prompt", "def", "--temperature", "0.9", "--top-k", "5",
          "--seed", "1", "--max-new-tokens", "5"])
    assert capsys.readouterr().out == first


def _fails(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_bad_input_is_one_line_before_any_work(trained, files, tmp_path, capsys):
    m = str(trained / "model")
    _fails(capsys, ["generate", str(tmp_path / "nope"), "--prompt", "x"], "no such directory")
    _fails(capsys, ["generate", m, "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be")
    _fails(capsys, ["generate", m, "--prompt", "x", "--temperature", "-1"], "--temperature must be a number >= 0")
    _fails(capsys, ["generate", m, "--prompt", "x", "--top-k", "0"], "--top-k must be")
    _fails(capsys, ["generate", m, "--prompt", "the cat " * 40], "max_seq_len")
    _fails(capsys, ["generate", m, "--prompt", "x", "--max-new-tokens", "40"], "does not fit")
    _fails(capsys, ["generate", m, "--prompt", ""], "--prompt 1 is empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    _fails(capsys, ["eval", str(broken), "--data", str(files["prose"])], "config.json: not valid JSON")
    empty, latin = tmp_path / "empty.txt", tmp_path / "latin.txt"
    empty.write_text("")
    latin.write_bytes("café\n".encode("latin-1"))
    _fails(capsys, ["eval", m, "--data", str(empty)], "data file is empty")
    _fails(capsys, ["eval", m, "--data", str(latin)], "not valid UTF-8")
    _fails(capsys, ["eval", m, "--data", str(files["prose"]), "--seq-len", "999"], "exceeds the model's max_seq_len")
    for bad in (empty, latin):  # train: the error comes before anything is written to --out
        out = tmp_path / f"out-{bad.stem}"
        _fails(capsys, _train_args(files, out)[:-4] + ["--data", str(bad), "--out", str(out)], "data file")
        assert not out.exists()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    _fails(capsys, _train_args(files, precious), "is not empty and is not a routelab run")
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt"]
    link = tmp_path / "out-link"
    (tmp_path / "out-link-target").mkdir()
    (tmp_path / "out-link-target" / "model").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out-link-target" / "model").rmdir()
    (tmp_path / "out-link-target" / "model").symlink_to(tmp_path / "elsewhere")
    link.symlink_to(tmp_path / "out-link-target")
    _fails(capsys, _train_args(files, link, "--overwrite"), "symbolic link")  # never writes the model through it
    _fails(capsys, _train_args(files, trained, "--resume", "--seed", "9"), "different configuration")


def test_generate_refuses_a_model_whose_routers_read_later_tokens(trained, tmp_path, capsys):
    from routelab.models import ModelConfig, MoETransformerLM

    _, tokenizer = routelab.load_model(trained / "model")
    cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), d_model=32, n_layers=2, n_heads=2, d_ff=32,
                      num_experts=4, max_seq_len=32, router="expert_choice")
    routelab.save_model(MoETransformerLM(cfg), tokenizer, tmp_path / "ec")
    _fails(capsys, ["generate", str(tmp_path / "ec"), "--prompt", "def"], "not causal at inference")
    assert main(["eval", str(tmp_path / "ec"), "--data", str(trained / "train.yaml")]) == 0  # eval needs no causality


def test_train_killed_by_sigkill_and_resumed_equals_uninterrupted(files, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    config = tmp_path / "longer.yaml"
    config.write_text(CONFIG.replace("steps: 8,", "steps: 24,").replace("checkpoint_every: 4", "checkpoint_every: 2"))
    args = ["--config", str(config), "--data", str(files["prose"]), str(files["code"]), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(routelab.__file__).parents[1])}
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "routelab", "train", *args, "--out", str(cut)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads((cut / "checkpoint.json").read_text())["step"] >= 4:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (cut / "model" / "model.safetensors").exists()
    assert main(["train", *args, "--out", str(cut), "--resume"]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "full")]) == 0
    want = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    got = load_file(str(cut / "model" / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_overwrite_claims_a_foreign_folder_and_a_rerun_replaces_only_its_own_files(files, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(_train_args(files, out, "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "model" / "model.safetensors").is_file()
    (out / "model" / "keep.txt").write_text("mine too")  # a user's file in the model folder: the run is refused
    assert main(_train_args(files, out, "--seed", "5")) == 2
    (out / "model" / "keep.txt").unlink()
    assert main(_train_args(files, out, "--seed", "5")) == 0  # a fresh run over its own earlier run
    assert routelab.load_model(out / "model")[0].config.router == "topk"
    assert (out / "notes.txt").read_text() == "mine"

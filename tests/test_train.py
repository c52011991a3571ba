"""Deterministic training, exact resume, checkpoints, and a loss that falls on real text."""

from __future__ import annotations

import json

import pytest
import torch

from routelab.data import Domain, file_corpus, tokenize_domains
from routelab.models import ModelConfig, MoETransformerLM
from routelab.train import TrainConfig, load_checkpoint, make_optimizer, save_checkpoint, train


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    words = ["cat", "dog", "bird"] * 120
    prose = "".join(f"The {w} sat on the mat number {i}, and then it slept.\n" for i, w in enumerate(words))
    code = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300))
    return tokenize_domains([Domain("prose", prose, "t"), Domain("code", code, "t")], vocab_size=320,
                            cache=tmp_path_factory.mktemp("cache"))


def tiny_model(data, **router_options) -> ModelConfig:
    return ModelConfig(vocab_size=data.vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=32, num_experts=4,
                       max_seq_len=32, router_options=router_options or {"k": 2})


TINY_TRAIN = TrainConfig(steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup=2, eval_every=4, eval_windows=2,
                         eval_batch_size=4, seed=3)


def test_same_seed_gives_identical_curves(tiny_data):
    a = train(tiny_model(tiny_data), TINY_TRAIN, tiny_data, progress=False)
    b = train(tiny_model(tiny_data), TINY_TRAIN, tiny_data, progress=False)
    assert [r["loss"] for r in a.train_curve] == [r["loss"] for r in b.train_curve]
    assert [r["val_loss"] for r in a.val_curve] == [r["val_loss"] for r in b.val_curve]
    c = train(tiny_model(tiny_data), TrainConfig(**{**TINY_TRAIN.__dict__, "seed": 4}), tiny_data, progress=False)
    assert [r["loss"] for r in a.train_curve] != [r["loss"] for r in c.train_curve]


@pytest.mark.parametrize("router_options", [{"k": 2}, {"k": 2, "balance": "loss_free", "jitter": 0.05}])
def test_killed_and_resumed_run_equals_uninterrupted_run(tiny_data, tmp_path, router_options):
    cfg = TrainConfig(**{**TINY_TRAIN.__dict__, "checkpoint_every": 4})
    full = train(tiny_model(tiny_data, **router_options), cfg, tiny_data, out_dir=tmp_path / "full", progress=False)

    def kill_at_step_6(step, record):
        if step == 6:
            raise Stop  # steps 5 and 6 are lost: the last checkpoint is at step 4

    with pytest.raises(Stop):
        train(tiny_model(tiny_data, **router_options), cfg, tiny_data, out_dir=tmp_path / "cut", progress=False,
              on_step=kill_at_step_6)
    assert json.loads((tmp_path / "cut" / "checkpoint.json").read_text())["step"] == 4
    resumed = train(tiny_model(tiny_data, **router_options), cfg, tiny_data, out_dir=tmp_path / "cut", resume=True,
                    progress=False)
    assert [r["loss"] for r in resumed.train_curve] == [r["loss"] for r in full.train_curve]
    assert [r["val_loss"] for r in resumed.val_curve] == [r["val_loss"] for r in full.val_curve]
    full_sd, resumed_sd = full.model.state_dict(), resumed.model.state_dict()
    assert full_sd.keys() == resumed_sd.keys()
    for key in full_sd:
        assert torch.equal(full_sd[key], resumed_sd[key]), key
    lines = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, 13))  # no duplicated steps


def test_checkpoint_files_are_complete_and_strict(tiny_data, tmp_path):
    torch.manual_seed(0)
    model = MoETransformerLM(tiny_model(tiny_data))
    optimizer = make_optimizer(model, TINY_TRAIN)
    model(*tiny_data.batch(0, batch_size=2, seq_len=16, seed=0))[1].backward()
    optimizer.step()
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=1, extra={"train_seconds": 0.0})
    # no temporary files are left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1.safetensors", "checkpoint.json"]
    other = MoETransformerLM(tiny_model(tiny_data))
    load_checkpoint(tmp_path, model=other, optimizer=make_optimizer(other, TINY_TRAIN))
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    bigger = MoETransformerLM(ModelConfig(**{**tiny_model(tiny_data).__dict__, "n_layers": 3}))
    with pytest.raises(ValueError, match="does not match the model: missing"):
        load_checkpoint(tmp_path, model=bigger, optimizer=make_optimizer(bigger, TINY_TRAIN))


def test_loss_decreases_on_shared_corpora(shared_data, tmp_path):
    files = [shared_data / "tinyshakespeare.txt", shared_data / "wikitext2-valid.txt"]
    domains = [Domain(d.name, d.text[:150_000], d.source) for d in file_corpus([f for f in files if f.exists()])]
    data = tokenize_domains(domains, vocab_size=1024, cache=tmp_path)
    model_cfg = ModelConfig(vocab_size=data.vocab_size, d_model=64, n_layers=2, n_heads=4, d_ff=96, num_experts=4,
                            max_seq_len=64)
    cfg = TrainConfig(steps=200, batch_size=8, seq_len=64, lr=3e-3, warmup=20, eval_every=100, eval_windows=8, seed=0)
    run = train(model_cfg, cfg, data, progress=False)
    first, last = run.val_curve[0]["val_loss"], run.val_curve[-1]["val_loss"]
    assert run.val_curve[0]["step"] == 0
    assert last < first - 1.5, (first, last)  # from ~ln(1024) ≈ 6.9 to well below
    load = torch.tensor(run.final["load"])
    assert (load.max(dim=1).values / load.mean(dim=1)).max() < 3.0  # no layer collapsed onto one expert


def test_resume_restarts_when_the_checkpoint_belongs_to_another_config(tiny_data, tmp_path, capsys):
    cfg = TrainConfig(**{**TINY_TRAIN.__dict__, "checkpoint_every": 4})
    other = TrainConfig(**{**cfg.__dict__, "seed": 7})
    expected = train(tiny_model(tiny_data), other, tiny_data, progress=False)

    def kill_at_step_6(step, record):
        if step == 6:
            raise Stop

    with pytest.raises(Stop):
        train(tiny_model(tiny_data), cfg, tiny_data, out_dir=tmp_path, progress=False, on_step=kill_at_step_6)
    resumed = train(tiny_model(tiny_data), other, tiny_data, out_dir=tmp_path, resume=True, progress=False)
    assert [r["loss"] for r in resumed.train_curve] == [r["loss"] for r in expected.train_curve]
    assert [r["val_loss"] for r in resumed.val_curve] == [r["val_loss"] for r in expected.val_curve]
    assert "different configuration" in capsys.readouterr().out


def test_resume_skips_a_partial_last_metrics_line(tiny_data, tmp_path):
    cfg = TrainConfig(**{**TINY_TRAIN.__dict__, "checkpoint_every": 4})
    full = train(tiny_model(tiny_data), cfg, tiny_data, out_dir=tmp_path / "full", progress=False)

    def kill_at_step_6(step, record):
        if step == 6:
            raise Stop

    with pytest.raises(Stop):
        train(tiny_model(tiny_data), cfg, tiny_data, out_dir=tmp_path / "cut", progress=False, on_step=kill_at_step_6)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"kind": "train", "step": 7, "lo')  # killed in the middle of an append
    resumed = train(tiny_model(tiny_data), cfg, tiny_data, out_dir=tmp_path / "cut", resume=True, progress=False)
    assert [r["loss"] for r in resumed.train_curve] == [r["loss"] for r in full.train_curve]
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, 13))
    assert sorted(p.name for p in (tmp_path / "cut").iterdir() if p.name.startswith("."))  == []  # no temp files


def test_atomic_write_syncs_the_data_before_the_rename(tmp_path, monkeypatch):
    import os

    from routelab import _atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(_atomic.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(_atomic.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    _atomic.atomic_write_text(tmp_path / "f.txt", "hello")
    assert (tmp_path / "f.txt").read_text() == "hello"
    assert events[:2] == ["fsync", "replace"]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lr", float("nan"), "train.lr must be a finite number"),
        ("lr", float("inf"), "train.lr must be a finite number"),
        ("grad_clip", float("nan"), "train.grad_clip must be a finite number"),
        ("weight_decay", float("-inf"), "train.weight_decay must be a finite number"),
        ("beta1", 1.5, r"train.beta1 must be in \[0, 1\)"),
        ("beta2", 1.0, r"train.beta2 must be in \[0, 1\)"),
        ("min_lr_ratio", 5, r"train.min_lr_ratio must be in \[0, 1\]"),
        ("lr", True, "train.lr must be a finite number"),
        ("steps", True, "train.steps must be a positive integer"),
    ],
)
def test_train_config_rejects_non_finite_and_out_of_range_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{**TINY_TRAIN.__dict__, field: value}).validate()
    TrainConfig(**{**TINY_TRAIN.__dict__, "beta1": 0.0, "min_lr_ratio": 1.0}).validate()  # the bounds themselves


def test_atomic_write_gives_new_files_the_umask_permissions(tmp_path):
    import os
    import stat

    from routelab import _atomic

    umask = os.umask(0o022)
    try:
        _atomic.atomic_write_text(tmp_path / "report.md", "hello")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o644  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]

"""Checkpoints and run files under careless or hostile edits (issue 17, items 7, 9, 10, 11): every error names the
file, resume treats a corrupt checkpoint as absent, loading checks every shape before touching the model, the weights
named by checkpoint.json must be a plain file in the folder, and stale temporaries are cleaned."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from routelab.data import Domain, tokenize_domains
from routelab.models import ModelConfig, MoETransformerLM
from routelab.train import CheckpointError, TrainConfig, load_checkpoint, make_optimizer, save_checkpoint, train


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    text = "".join(f"The cat {i} sat on the mat, and then it slept.\n" for i in range(300))
    return tokenize_domains([Domain("prose", text, "t")], vocab_size=300, cache=tmp_path_factory.mktemp("cache"))


def model_config(data, d_ff=16):
    return ModelConfig(vocab_size=data.vocab_size, d_model=16, n_layers=2, n_heads=2, d_ff=d_ff, num_experts=4,
                       max_seq_len=16, router_options={"k": 2, "balance": "loss_free"})


CFG = TrainConfig(steps=6, batch_size=2, seq_len=16, warmup=0, eval_every=3, eval_windows=1, eval_batch_size=2,
                  checkpoint_every=2, seed=1)


def cut_at_step_4(data, out):
    def stop(step, record):
        if step == 4:
            raise Stop

    with pytest.raises(Stop):
        train(model_config(data), CFG, data, out_dir=out, progress=False, on_step=stop)


def losses(result):
    return [r["loss"] for r in result.train_curve], [r["val_loss"] for r in result.val_curve]


@pytest.mark.parametrize("damage", ["truncated weights", "bad metrics line"])
def test_resume_treats_a_corrupt_checkpoint_as_absent_and_names_the_file(data, tmp_path, damage):
    fresh = train(model_config(data), CFG, data, out_dir=tmp_path / "fresh", progress=False)
    out = tmp_path / "run"
    cut_at_step_4(data, out)
    meta = json.loads((out / "checkpoint.json").read_text())
    if damage == "truncated weights":
        weights = out / meta["weights"]
        weights.write_bytes(weights.read_bytes()[:300])
        named = str(weights)
    else:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        lines[1] = lines[1][:10]  # a garbled record in the middle, not a cut-short last line
        (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        named = f"{out / 'metrics.jsonl'} has a corrupt record on line 2"
    notes = []
    resumed = train(model_config(data), CFG, data, out_dir=out, resume=True, progress=False, log=notes.append)
    assert len(notes) == 1 and named in notes[0] and "treating the checkpoint as absent" in notes[0], notes
    assert losses(resumed) == losses(fresh)  # retrained from scratch, exactly like an uninterrupted run
    for key, value in fresh.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_load_checkpoint_checks_every_shape_before_changing_anything(data, tmp_path):
    torch.manual_seed(0)
    wide = MoETransformerLM(model_config(data, d_ff=32))
    save_checkpoint(tmp_path, model=wide, optimizer=make_optimizer(wide, CFG), step=1, extra={})
    model = MoETransformerLM(model_config(data, d_ff=16))  # same keys, other shapes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"checkpoint-1.safetensors does not match the model's shapes: "
                                              r"blocks\.0\.ffn\.experts\.w_gate_up \[4, 16, 64\] \(model: \[4, 16, 32\]\)"):
        load_checkpoint(tmp_path, model=model, optimizer=make_optimizer(model, CFG))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # not one tensor was overwritten


def test_checkpoint_weights_must_be_a_plain_file_inside_the_folder(data, tmp_path):
    torch.manual_seed(0)
    model = MoETransformerLM(model_config(data))
    folder = tmp_path / "run"
    save_checkpoint(folder, model=model, optimizer=make_optimizer(model, CFG), step=2, extra={})
    meta = json.loads((folder / "checkpoint.json").read_text())
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(folder / meta["weights"], outside / "w.safetensors")  # a valid file, but not in the folder
    (folder / "link.safetensors").symlink_to(outside / "w.safetensors")
    for name, message in [("../../../../etc/passwd", "'weights' must be a file name inside"),
                          ("../outside/w.safetensors", "'weights' must be a file name inside"),
                          (str(outside / "w.safetensors"), "'weights' must be a file name inside"),
                          ("..", "'weights' must be a file name inside"),
                          ("link.safetensors", "names link.safetensors, which is not a regular file in"),
                          (["x"], "'weights' must be a file name inside")]:
        (folder / "checkpoint.json").write_text(json.dumps({**meta, "weights": name}))
        with pytest.raises(CheckpointError, match=message) as info:
            load_checkpoint(folder, model=model, optimizer=make_optimizer(model, CFG))
        assert str(folder / "checkpoint.json") in str(info.value) or str(folder) in str(info.value)


def test_unreadable_checkpoint_json_names_the_file(data, tmp_path):
    model = MoETransformerLM(model_config(data))
    (tmp_path / "checkpoint.json").write_bytes(b"\xff{ not json")
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'checkpoint.json'} cannot be read"):
        load_checkpoint(tmp_path, model=model, optimizer=make_optimizer(model, CFG))


def test_stale_temporaries_of_our_naming_are_removed_and_nothing_else(data, tmp_path):
    out = tmp_path / "run"
    cut_at_step_4(data, out)
    stale = [out / ".checkpoint-6.safetensors.0123456789abcdef.tmp", out / ".metrics.jsonl.fedcba9876543210.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)  # what a kill between writing and renaming leaves
    kept = [out / ".notes.tmp", out / "x.0123456789abcdef.tmp", out / ".a.0123456789abcdeg.tmp"]
    for path in kept:
        path.write_text("not ours")
    (out / "dir.0123456789abcdef.tmp").mkdir()
    train(model_config(data), CFG, data, out_dir=out, resume=True, progress=False)
    assert not any(p.exists() for p in stale)
    assert all(p.read_text() == "not ours" for p in kept) and (out / "dir.0123456789abcdef.tmp").is_dir()

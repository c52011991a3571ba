"""Model folders: save_model → load_model round trips exactly; mismatched folders are refused, naming file and problem."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import routelab
from routelab.data.tokenizer import train_tokenizer
from routelab.models import ModelConfig, MoETransformerLM
from routelab.models.io import ModelFolderError

TINY = dict(vocab_size=300, d_model=32, n_layers=3, n_heads=2, d_ff=48, num_experts=4, max_seq_len=32)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["def f(x):\n    return x + 1\n" * 20, "The quick brown fox.\n" * 20], vocab_size=300)


def _trained_like(model: MoETransformerLM) -> MoETransformerLM:
    # Perturb every tensor of the state (router buffers included) so a load that skipped any would differ.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.randn(value.shape, generator=g).to(value.dtype) * 0.01)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "router,options,schedule",
    [
        ("topk", {"k": 2, "balance": "loss_free"}, {"shape": "descending", "k_max": 3}),
        ("recurrent", {"k": 2}, None),  # one cell shared by every layer: stored once
        ("kmeans", {}, None),  # centroid buffers kept in fp32 under a bf16 model
    ],
)
def test_round_trip_bit_identical(tmp_path, tokenizer, dtype, router, options, schedule):
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY, router=router, router_options=options, k_schedule=schedule)
    model = _trained_like(MoETransformerLM(cfg)).to(dtype).eval()
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        want = model(ids)[0]
    routelab.save_model(model, tokenizer, tmp_path / "m", training={"steps": 3})
    loaded, tok = routelab.load_model(tmp_path / "m")
    assert not loaded.training and loaded.config == cfg
    with torch.no_grad():
        got = loaded(ids)[0]
    assert got.dtype == dtype and torch.equal(got, want)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert tok.to_str() == tokenizer.to_str()
    assert json.loads((tmp_path / "m" / "training.json").read_text()) == {"steps": 3}
    if router == "recurrent":  # shared parameters stay shared after loading, and are stored once
        cells = {id(layer.router.cell) for layer in loaded.moe_layers}
        assert len(cells) == 1
        stored = load_file(str(tmp_path / "m" / "model.safetensors"))
        assert sum(".router.cell." in k for k in stored) < sum(".router.cell." in k for k in model.state_dict())


def _folder(tmp_path, tokenizer, **cfg_changes):
    torch.manual_seed(0)
    model = MoETransformerLM(ModelConfig(**{**TINY, **cfg_changes}))
    return routelab.save_model(model, tokenizer, tmp_path / "m")


def _edit_config(folder, fn):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_refuses_mismatched_folders(tmp_path, tokenizer):
    folder = _folder(tmp_path, tokenizer)
    weights = load_file(str(folder / "model.safetensors"))

    def refused(match):
        with pytest.raises(ModelFolderError, match=match) as info:
            routelab.load_model(folder)
        assert "\n" not in str(info.value)

    save_file({k: v for k, v in weights.items() if "blocks.1.attn.qkv" not in k}, str(folder / "model.safetensors"))
    refused(r"model\.safetensors: .*missing keys \[blocks\.1\.attn\.qkv\.weight\]")
    save_file({**weights, "extra.weight": torch.zeros(2)}, str(folder / "model.safetensors"))
    refused(r"model\.safetensors: .*unexpected keys \[extra\.weight\]")
    save_file({**weights, "embed.weight": torch.zeros(301, 32)}, str(folder / "model.safetensors"))
    refused(r"model\.safetensors: tensor 'embed\.weight' has shape \[301, 32\]")
    save_file({**weights, "embed.weight": weights["embed.weight"].double()}, str(folder / "model.safetensors"))
    refused(r"model\.safetensors: tensor 'embed\.weight' has dtype F64")
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    refused(r"model\.safetensors: not a readable safetensors file")
    save_file(weights, str(folder / "model.safetensors"))
    routelab.load_model(folder)  # restored: loads again

    _edit_config(folder, lambda d: d["model"].update(router="warp_drive"))
    refused(r"config\.json: unknown router 'warp_drive'; valid names: .*topk")
    _edit_config(folder, lambda d: d["model"].update(router="topk", format_version=None))
    refused(r"config\.json: unknown model field\(s\) format_version")
    _edit_config(folder, lambda d: (d["model"].pop("format_version"), d.update(format_version=2)))
    refused(r"config\.json: format_version 2 is newer than this routelab reads \(1\)")
    _edit_config(folder, lambda d: d.update(format_version=1, dtype="float8"))
    refused(r"config\.json: dtype must be one of")
    _edit_config(folder, lambda d: (d.update(dtype="float32"), d["model"].update(d_model=48)))
    refused(r"model\.safetensors: tensor '.*' has shape")  # config and weights disagree
    _edit_config(folder, lambda d: d["model"].update(d_model=32, router_options={"k": 9}))
    refused(r"config\.json: .*k")
    _edit_config(folder, lambda d: d["model"].update(router_options={}))
    routelab.load_model(folder)

    (folder / "tokenizer.json").write_text("{not json")
    refused(r"tokenizer\.json: not a tokenizers JSON file")
    (folder / "tokenizer.json").unlink()
    refused(r"tokenizer\.json: missing")
    (folder / "config.json").write_text("{")
    refused(r"config\.json: not valid JSON")
    (folder / "config.json").unlink()
    refused(r"config\.json: missing")
    with pytest.raises(ModelFolderError, match="no such directory"):
        routelab.load_model(tmp_path / "nowhere")


def test_save_never_replaces_what_it_did_not_write(tmp_path, tokenizer):
    model = MoETransformerLM(ModelConfig(**TINY))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(ModelFolderError, match="holds notes.txt, which a model folder does not"):
        routelab.save_model(model, tokenizer, precious)
    assert (precious / "notes.txt").read_text() == "mine"
    (precious / "notes.txt").rename(precious / "config.json")
    with pytest.raises(ModelFolderError, match="not a routelab model folder"):
        routelab.save_model(model, tokenizer, precious)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelFolderError, match="not a folder"):
        routelab.save_model(model, tokenizer, tmp_path / "file")
    (tmp_path / "link").symlink_to(precious)
    with pytest.raises(ModelFolderError, match="symbolic link"):
        routelab.save_model(model, tokenizer, tmp_path / "link")
    # A model folder is replaced whole: no file of the old one survives, and no temporary folder is left.
    folder = routelab.save_model(model, tokenizer, tmp_path / "m", training={"a": 1})
    routelab.save_model(model, tokenizer, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "link", "m", "precious"]
    (folder / "mine.txt").write_text("a user's file inside a model folder is never deleted")
    with pytest.raises(ModelFolderError, match="holds mine.txt"):
        routelab.save_model(model, tokenizer, folder)
    (folder / "mine.txt").unlink()
    (folder / ".routelab-run.json").write_text('{"routelab": "run"}')  # a run's ownership marker moves over
    routelab.save_model(model, tokenizer, folder)
    assert (folder / ".routelab-run.json").read_text() == '{"routelab": "run"}'
    # A training dict that is not JSON fails before anything is written.
    with pytest.raises(ValueError):
        routelab.save_model(model, tokenizer, tmp_path / "n", training={"loss": float("nan")})
    assert not (tmp_path / "n").exists()


def test_import_routelab_stays_light():
    code = (
        "import sys, routelab\n"
        "heavy = [m for m in ('safetensors', 'tokenizers', 'routelab.models.io') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(routelab.load_model) and 'routelab.models.io' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": "src"}, cwd=".")

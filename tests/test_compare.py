"""`routelab compare`: the smoke preset end to end, presets, and clear errors before any training."""

from __future__ import annotations

import json
import re
import math

import pytest
import yaml

import routelab

from routelab.cli import main
from routelab.compare import ConfigError, load_preset, resolve
from routelab.compare.config import PRESETS
from routelab.routing.registry import list_routers

# The autoregressive presets cover every router family and checkpoint while training; the diffusion preset is a
# focused comparison (expert choice with and without a t-dependent capacity, top-k) and its variants do not
# checkpoint (tests/test_diffusion_lm.py covers it).
LM_PRESETS = [p for p in PRESETS if load_preset(p)["model"].get("kind", "lm") == "lm"]
ZOO = {"topk", "expert_choice", "sinkhorn", "null_experts", "top_p", "cosine", "hash", "random_fixed", "kmeans",
       "recurrent", "similarity"}


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ROUTELAB_CACHE", str(tmp_path_factory.getbasetemp() / "routelab-cache"))


def test_smoke_preset_writes_every_variant_and_the_plots(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["compare", "--preset", "smoke", "--steps", "4", "--out", str(out), "--quiet"]) == 0
    expected, _ = resolve(preset="smoke")
    names = [v["name"] for v in expected["variants"]]
    assert "topk" in names and len(names) == len({v["name"] for v in load_preset("smoke")["variants"]
                                                   if v["router"] in list_routers()})
    results = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in results["variants"]] == names
    for v in results["variants"]:
        assert "error" not in v, v.get("error")
        assert math.isfinite(v["val_perplexity"]) and v["val_perplexity"] > 1
        assert 0 < v["mean_experts_per_token"] <= expected["model"]["num_experts"]
        assert v["imbalance_max_over_mean"] >= 1.0 and 0 <= v["dropped_fraction"] <= 1
        assert [r["step"] for r in v["val_curve"]][0] == 0 and v["val_curve"][-1]["step"] == 4
        model, _ = routelab.load_model(out / "variants" / v["name"] / "model")  # every variant's final model
        assert model.config.router == v["router"] and model.per_layer_options == v["per_layer_options"]
    report = (out / "report.md").read_text()
    for name in names:
        assert f"| {name} |" in report
    for png in ("val_loss.png", "expert_load.png", "experts_per_token.png", "domain_load.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in report
    used = yaml.safe_load((out / "config.yaml").read_text())
    assert used["train"]["steps"] == 4 and [v["name"] for v in used["variants"]] == names

    # --resume reads finished variants back instead of retraining them
    assert main(["compare", "--preset", "smoke", "--steps", "4", "--out", str(out), "--quiet", "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert [v["val_loss"] for v in again["variants"]] == [v["val_loss"] for v in results["variants"]]
    capsys.readouterr()
    assert main(["compare", "--preset", "smoke", "--steps", "5", "--out", str(out), "--quiet", "--resume"]) == 2
    assert "different configuration" in capsys.readouterr().err


def test_routers_flag_and_data_files(tmp_path, capsys):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("".join(f"The {i}th sentence of a small English text.\n" for i in range(600)))
    b.write_text("".join(f"value_{i} = compute({i}, {i * 3})\n" for i in range(600)))
    out = tmp_path / "report"
    args = ["compare", "--preset", "smoke", "--routers", "topk", "--data", str(a), str(b), "--steps", "3",
            "--out", str(out), "--quiet"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [v["router"] for v in results["variants"]] == ["topk"]
    assert [d["name"] for d in results["data"]["domains"]] == ["a", "b"]
    assert set(results["variants"][0]["val_loss_by_domain"]) == {"a", "b"}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--routers", "topk,no_such_router"], "unknown router 'no_such_router'; valid names: .*topk"),
        (["--data", "MISSING"], "data file not found: .*missing.txt"),
        (["--data", "EMPTY"], "data file is empty: .*empty.txt"),
        (["--config", "BADFIELD"], "train: unknown field\\(s\\) stepz; valid fields: .*steps"),
        (["--config", "BADVALUE"], "train.lr must be"),
        (["--config", "BADOPTION"], "variants\\[0\\] \\(topk\\): router 'topk' has no option\\(s\\) kk"),
        (["--preset", "huge"], "unknown preset 'huge'; valid presets: smoke, default, depth, paper, diffusion"),
        (["--steps", "0"], "--steps must be a positive integer"),
    ],
)
def test_bad_input_fails_clearly_before_training(tmp_path, capsys, extra, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "badfield.yaml").write_text("train: {stepz: 3}\n")
    (tmp_path / "badvalue.yaml").write_text("train: {lr: -1}\n")
    (tmp_path / "badoption.yaml").write_text("variants: [{router: topk, options: {kk: 2}}]\n")
    paths = {"MISSING": tmp_path / "missing.txt", "EMPTY": tmp_path / "empty.txt",
             "BADFIELD": tmp_path / "badfield.yaml", "BADVALUE": tmp_path / "badvalue.yaml",
             "BADOPTION": tmp_path / "badoption.yaml"}
    extra = [str(paths.get(x, x)) for x in extra]
    out = tmp_path / "report"
    assert main(["compare", "--preset", "smoke", "--out", str(out), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("routelab compare: error: ")
    import re

    assert re.search(message, err), err
    assert not out.exists()  # nothing was trained or written


@pytest.mark.parametrize("preset", ["smoke", "default"])
def test_presets_are_valid_and_cover_the_router_families(preset):
    raw = load_preset(preset)
    assert {v["router"] for v in raw["variants"]} >= ZOO
    cfg, notes = resolve(preset=preset)  # builds every registered variant's routers: options are checked
    registered = set(list_routers())
    assert {v["router"] for v in cfg["variants"]} == ZOO & registered
    assert len(notes) == len([v for v in raw["variants"] if v["router"] not in registered])


def test_unregistered_routers_in_a_preset_are_skipped_with_a_note(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("variants: [{router: topk}, {name: future, router: not_yet_written}]\n")
    cfg, notes = resolve(preset="smoke", config_file=cfg_file)
    assert [v["name"] for v in cfg["variants"]] == ["topk"]
    assert notes == ["skipping variant 'future': router 'not_yet_written' is not registered in this installation"]
    with pytest.raises(ConfigError, match="unknown router 'not_yet_written'"):
        resolve(preset="smoke", config_file=cfg_file, routers=["not_yet_written"])


class Interrupted(Exception):
    pass


def test_resume_never_reuses_results_or_checkpoints_of_a_different_run(tmp_path, monkeypatch, capsys):
    import routelab.compare.runner as runner

    def compare(out, seed, *more):
        return main(["compare", "--preset", "smoke", "--routers", "topk,hash", "--steps", "3", "--seed", str(seed),
                     "--out", str(out), "--quiet", *more])

    def val_losses(out):
        return {v["name"]: v["val_loss"] for v in json.loads((out / "results.json").read_text())["variants"]}

    out, fresh = tmp_path / "report", tmp_path / "fresh"
    assert compare(fresh, 1) == 0  # the expected seed-1 numbers, from a folder nothing else touched
    assert compare(out, 0) == 0
    seed0 = val_losses(out)
    assert seed0 != val_losses(fresh)

    real = runner.run_variant

    def interrupt_before_hash(cfg, variant, *args, **kwargs):
        if variant["name"] == "hash":
            raise Interrupted
        return real(cfg, variant, *args, **kwargs)

    monkeypatch.setattr(runner, "run_variant", interrupt_before_hash)
    with pytest.raises(Interrupted):
        compare(out, 1)  # a fresh run with seed 1, stopped after topk
    monkeypatch.setattr(runner, "run_variant", real)
    assert not (out / "variants" / "hash" / "result.json").exists()  # the fresh run removed the seed-0 result
    assert not (out / "report.md").exists() and not (out / "results.json").exists()  # and the seed-0 report
    assert compare(out, 1, "--resume") == 0
    assert val_losses(out) == val_losses(fresh)

    # a result stored for another configuration (or without a hash) is retrained, with a note
    result_path = out / "variants" / "hash" / "result.json"
    stored = json.loads(result_path.read_text())
    result_path.write_text(json.dumps({**stored, "variant_hash": "0" * 64, "val_loss": 99.0}))
    capsys.readouterr()
    assert compare(out, 1, "--resume") == 0
    assert val_losses(out) == val_losses(fresh)
    assert "hash: the stored result was computed with a different configuration" in capsys.readouterr().out


def test_resume_reruns_a_variant_that_failed(tmp_path, capsys):
    out = tmp_path / "report"
    args = ["compare", "--preset", "smoke", "--routers", "topk", "--steps", "3", "--out", str(out), "--quiet"]
    assert main(args) == 0
    expected = json.loads((out / "results.json").read_text())["variants"][0]["val_loss"]
    result_path = out / "variants" / "topk" / "result.json"
    stored = json.loads(result_path.read_text())
    kept = {k: stored[k] for k in ("name", "router", "options", "k_schedule", "variant_hash") if k in stored}
    result_path.write_text(json.dumps({**kept, "error": "MemoryError: boom", "wall_seconds": 0.1}))
    assert main([*args, "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())["variants"][0]
    assert "error" not in again and again["val_loss"] == expected
    assert "previous attempt failed" in capsys.readouterr().out


def test_layer_level_errors_and_bad_numbers_surface_before_training(tmp_path, monkeypatch, capsys):
    import routelab.models.transformer as transformer

    out = tmp_path / "report"
    for text, message in [("model: {shared_experts: true}\n", "model.shared_experts must be an integer"),
                          ("train: {beta1: 1.5}\n", r"train.beta1 must be in \[0, 1\)"),
                          ("train: {grad_clip: .nan}\n", "train.grad_clip must be a finite number"),
                          ("data: {val_fraction: .nan}\n", "data.val_fraction must be a number in")]:
        (tmp_path / "c.yaml").write_text(text)
        assert main(["compare", "--preset", "smoke", "--config", str(tmp_path / "c.yaml"), "--out", str(out),
                     "--quiet"]) == 2
        assert re.search(message, capsys.readouterr().err)
        assert not out.exists()

    class LayerSaysNo(transformer.MoELayer):
        def __init__(self, *args, **kwargs):
            raise ValueError("the layer refuses these options")

    monkeypatch.setattr(transformer, "MoELayer", LayerSaysNo)  # an error only building the whole model finds
    with pytest.raises(ConfigError, match=r"variants\[0\] \(topk\): the layer refuses these options"):
        resolve(preset="smoke")


@pytest.mark.parametrize(
    "yaml_text, extra, message",
    [
        ("train: {warmup: x}\n", ["--steps", "5"], "train.warmup must be an integer >= 0, got 'x'"),
        ("train: {eval_every: x}\n", ["--steps", "5"], "train.eval_every must be a positive integer, got 'x'"),
        ("train: 5\n", ["--steps", "5"], "train: must be a mapping of .*steps.*, got 5"),
        ("data: 5\n", ["--data", "a.txt"], "data: must be a mapping of .*source.*, got 5"),
        ("model: {max_seq_len: abc}\n", [], "model.max_seq_len must be an integer >= 1, got 'abc'"),
        ("variants: [{router: topk, k_schedule: [1, 2]}]\n", [],
         r"variants\[0\].k_schedule must be null or a mapping \{shape, k_max, k, match_budget\}, got \[1, 2\]"),
        ("description: [1]\n", [], "description must be a string"),
    ],
)
def test_malformed_config_values_end_in_one_clear_error(tmp_path, capsys, yaml_text, extra, message):
    (tmp_path / "c.yaml").write_text(yaml_text)
    out = tmp_path / "report"
    code = main(["compare", "--preset", "smoke", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--quiet",
                 *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("routelab compare: error: ") and re.search(message, err), err
    assert not out.exists()


def test_out_that_is_a_file_fails_before_loading_data(tmp_path, capsys, monkeypatch):
    import routelab.compare.runner as runner

    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before --out was checked")

    monkeypatch.setattr(runner, "load_data", no_data)
    a_file = tmp_path / "taken"
    a_file.write_text("keep me")
    for out in (a_file, a_file / "report"):
        assert main(["compare", "--preset", "smoke", "--routers", "topk", "--steps", "2", "--out", str(out),
                     "--quiet"]) == 2
        err = capsys.readouterr().err
        assert re.search(r"routelab compare: error: --out.* must be a folder .* is a file", err), err
    assert a_file.read_text() == "keep me"


@pytest.mark.parametrize("preset", LM_PRESETS)
def test_presets_checkpoint_during_training_so_resume_continues_a_variant(preset):
    train = load_preset(preset)["train"]
    assert 1 <= train.get("checkpoint_every", 0) < train["steps"]


def test_report_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "report"
    assert main(["compare", "--preset", "smoke", "--routers", "topk,top_p", "--steps", "2", "--out", str(out),
                 "--quiet"]) == 0
    again = tmp_path / "again"
    again.mkdir()
    script = (
        "import json, sys, matplotlib\n"
        "matplotlib.use('svg')\n"
        "from routelab.compare.report import write_report\n"
        "summary = json.loads(open(sys.argv[1]).read())\n"
        "written = write_report(summary, __import__('pathlib').Path(sys.argv[2]))\n"
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules, len(written))\n"
    )
    import os
    from pathlib import Path

    import routelab

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(routelab.__file__).parents[1]),
                                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, str(out / "results.json"), str(again)], capture_output=True,
                          text=True, check=True, env=env)
    assert done.stdout.split() == ["svg", "False", "6"]  # five plots (quality_vs_compute included) + report.md
    for png in ("val_loss.png", "expert_load.png", "experts_per_token.png", "domain_load.png"):
        assert (again / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

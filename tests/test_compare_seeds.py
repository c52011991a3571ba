"""`compare --seeds N`: t-intervals and paired differences against hand computations; the smoke preset end to end."""

from __future__ import annotations

import json
import math

import pytest

from routelab.cli import main
from routelab.compare import ConfigError, resolve
from routelab.compare.stats import paired_difference, t_interval, t_quantile_975


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ROUTELAB_CACHE", str(tmp_path_factory.getbasetemp() / "routelab-cache"))


def test_t_interval_equals_a_hand_computation():
    # 10, 12, 14: mean 12, sample sd sqrt((4 + 0 + 4) / 2) = 2, t_{0.975, 2} = 4.302653 (printed tables)
    ci = t_interval([10.0, 12.0, 14.0])
    half = 4.302653 * 2.0 / math.sqrt(3.0)
    assert ci["mean"] == pytest.approx(12.0) and ci["sd"] == pytest.approx(2.0)
    assert ci["half_width"] == pytest.approx(half, rel=1e-6)
    assert (ci["low"], ci["high"]) == pytest.approx((12.0 - half, 12.0 + half), rel=1e-6)
    # two values: t_{0.975, 1} = 12.706205; sd of (1, 3) = sqrt(2)
    two = t_interval([1.0, 3.0])
    assert two["half_width"] == pytest.approx(12.706205 * math.sqrt(2.0) / math.sqrt(2.0), rel=1e-6)
    one = t_interval([5.0])
    assert one["mean"] == 5.0 and math.isnan(one["half_width"])


def test_paired_difference_and_its_verdict_equal_a_hand_computation():
    # differences 0.1, 0.2, 0.1: mean 0.13333, sd sqrt(((1/30)^2 * 2 + (2/30)^2) / 2) = 0.057735
    d = paired_difference([1.0, 1.2, 1.1], [0.9, 1.0, 1.0])
    sd = math.sqrt(((1 / 30) ** 2 * 2 + (2 / 30) ** 2) / 2)
    half = 4.302653 * sd / math.sqrt(3)
    assert d["mean"] == pytest.approx(0.4 / 3) and d["half_width"] == pytest.approx(half, rel=1e-5)
    assert d["low"] < 0 < d["high"] and d["distinguishable"] is False  # interval holds 0: noise
    # differences 0.10, 0.11, 0.12: mean 0.11, sd 0.01, half-width 4.302653 * 0.01 / sqrt(3) = 0.02484: excludes 0
    real = paired_difference([1.10, 1.21, 1.32], [1.0, 1.1, 1.2])
    assert real["mean"] == pytest.approx(0.11) and real["half_width"] == pytest.approx(4.302653 * 0.01 / math.sqrt(3),
                                                                                       rel=1e-5)
    assert real["distinguishable"] is True
    assert paired_difference([0.9, 0.99, 1.08], [1.0, 1.1, 1.2])["high"] < 0  # a better variant: a negative difference
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0], [1.0, 2.0])


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 10, 29, 30, 31, 40, 100, 1000):
        assert t_quantile_975(df) == pytest.approx(float(stats.t.ppf(0.975, df)), abs=2e-6)
    with pytest.raises(ValueError, match="df"):
        t_quantile_975(0)


@pytest.mark.parametrize("value", [0, -1, 101, 1.5, "2", True])
def test_bad_seeds_fail_clearly(value, tmp_path, capsys):
    with pytest.raises(ConfigError, match="seeds must be an integer from 1 to 100"):
        resolve(preset="smoke", seeds=value)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"seeds: {json.dumps(value)}\n")
    assert main(["compare", "--preset", "smoke", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "seeds must be an integer" in capsys.readouterr().err


def test_compare_seeds_2_on_the_smoke_preset_end_to_end(tmp_path, monkeypatch, capsys):
    out = tmp_path / "seeds"
    args = ["compare", "--preset", "smoke", "--routers", "topk,hash", "--steps", "3", "--quiet"]
    assert main([*args, "--seeds", "2", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1]
    topk, hash_ = results["variants"]
    for v in (topk, hash_):
        assert [r["seed"] for r in v["runs"]] == [0, 1]
        for seed in (0, 1):
            assert (out / "variants" / v["name"] / f"seed-{seed}" / "model" / "model.safetensors").is_file()
        ppl = [r["val_perplexity"] for r in v["runs"]]
        assert v["seed_stats"]["val_perplexity"]["mean"] == pytest.approx(sum(ppl) / 2)
        assert v["seed_stats"]["val_perplexity"]["half_width"] == pytest.approx(12.706205 * abs(ppl[0] - ppl[1]) / 2,
                                                                                 rel=1e-6)
    diffs = [h["val_loss"] - t["val_loss"] for h, t in zip(hash_["runs"], topk["runs"])]
    assert hash_["paired_vs_reference"]["reference"] == "topk"
    assert hash_["paired_vs_reference"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert topk["paired_vs_reference"]["mean"] == 0.0
    report = (out / "report.md").read_text()
    assert "Δ loss vs topk" in report and "| hash |" in report and "](quality_vs_compute.png)" in report
    assert (out / "quality_vs_compute.png").read_bytes()[:4] == b"\x89PNG"

    # seed 1 of the comparison is the same run as a one-seed comparison with --seed 1 (same init, same batches)
    single = tmp_path / "single"
    assert main([*args, "--seed", "1", "--out", str(single)]) == 0
    alone = json.loads((single / "results.json").read_text())["variants"]
    assert [v["val_loss"] for v in alone] == [topk["runs"][1]["val_loss"], hash_["runs"][1]["val_loss"]]

    # --resume reads every seed's result back instead of training again
    import routelab.compare.runner as runner

    def no_training(*a, **k):
        raise AssertionError("resume retrained a finished seed")

    monkeypatch.setattr(runner, "run_variant", no_training)
    assert main([*args, "--seeds", "2", "--out", str(out), "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert [r["val_loss"] for v in again["variants"] for r in v["runs"]] == \
           [r["val_loss"] for v in results["variants"] for r in v["runs"]]
    capsys.readouterr()
    assert main([*args, "--seeds", "3", "--out", str(out), "--resume"]) == 2  # another seed count: another config
    assert "different configuration" in capsys.readouterr().err


def test_depth_and_paper_presets_hold_the_new_methods_and_three_seeds():
    depth, notes = resolve(preset="depth")  # builds every variant's routers and a meta model: options are checked
    assert not notes and depth["seeds"] == 3 and depth["variants"][0]["name"] == "topk"
    by_name = {v["name"]: v for v in depth["variants"]}
    assert set(by_name) == {"topk", "chain_of_experts", "unipool", "rexmoe", "rexmoe_psr", "prototype", "duo",
                            "mod"}
    assert by_name["mod"]["model"] == {"mod_capacity": 0.5, "mod_every": 2}
    assert by_name["chain_of_experts"]["model"] == {"chain_iterations": 2}
    assert by_name["rexmoe"]["model"]["expert_pool"] == "rexmoe" and by_name["prototype"]["router"] == "prototype"
    assert by_name["rexmoe_psr"]["model"]["reuse_schedule"] == {"start": 24, "end": 72}
    paper, _ = resolve(preset="paper")
    assert paper["seeds"] == 3 and paper["model"]["d_model"] > depth["model"]["d_model"]
    with pytest.raises(ConfigError, match=r"variants\[0\].model: unknown field\(s\) chain"):
        resolve(preset="smoke", base={**depth, "variants": [{"router": "topk", "model": {"chain": 2}}]})

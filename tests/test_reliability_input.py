"""Absurd or hostile input is refused before anything is allocated or read without bound (issue 17, items 4-6, 8):
sizes against the machine's RAM, int64 bounds, bounded YAML, one-line errors for read-only folders, garbled files,
long or dotted names and mismatched dtypes."""

from __future__ import annotations

import os
import re
import resource
import tempfile
from pathlib import Path

import pytest
import torch

import routelab
from routelab.cli import main
from routelab.compare import ConfigError, resolve
from routelab.models import ModelConfig, MoETransformerLM
from routelab.train import TrainConfig
from routelab.train.memory import GiB, check_training_memory, training_memory_terms

@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ROUTELAB_CACHE", str(tmp_path_factory.getbasetemp() / "routelab-cache"))


def config_file(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


# -- item 4: sizes ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, field", [
    ("model: {d_model: 1000000000}", "model.d_model=1000000000"),
    ("model: {num_experts: 100000000}", "model.num_experts=100000000"),
    ("model: {d_model: 100000000}", "model.d_model=100000000"),
    ("model: {n_layers: 100000000}", "model.n_layers=100000000"),
    ("model: {max_seq_len: 100000000000}", "model.max_seq_len=100000000000"),
    ("train: {batch_size: 100000000}", "train.batch_size=100000000"),
    ("data: {vocab_size: 10000000000}", "model.vocab_size=10000000000"),
])
def test_absurd_sizes_are_refused_from_an_estimate_without_allocating(tmp_path, text, field):
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ConfigError) as info:
        resolve(preset="smoke", config_file=config_file(tmp_path, text))
    message = str(info.value)
    assert re.search(r"needs at least [\d,.]+ GiB, more than this machine's [\d,.]+ GiB of RAM", message), message
    assert field in message
    # an estimate, not a build: the peak memory barely moves (building would allocate gigabytes)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200 * 1024  # KiB: under 200 MB more


def test_the_estimate_is_a_lower_bound_of_the_real_parameters():
    config = ModelConfig(vocab_size=500, d_model=32, n_layers=3, n_heads=4, d_ff=48, num_experts=6, moe_every=1,
                         shared_experts=1, max_seq_len=64, router_options={"k": 2})
    train = TrainConfig(batch_size=2, seq_len=16)
    terms = training_memory_terms(config, train)
    estimated_params = sum(terms[k][0] for k in ("embedding", "attention weights", "expert weights",
                                                  "shared and dense FFN weights")) // 16
    real_params = sum(p.numel() for p in MoETransformerLM(config).parameters())
    assert estimated_params <= real_params <= 1.02 * estimated_params  # only the norms are left out
    with pytest.raises(ValueError, match=r"the largest part is the .* make .* smaller"):
        check_training_memory(config, train, available=1000)
    assert check_training_memory(config, train, available=64 * GiB) > real_params * 16


@pytest.mark.parametrize("extra, message", [
    (["--steps", str(10**30)], r"--steps must be a positive integer <= 9223372036854775807, got 10000"),
    (["--seed", str(2**70)], r"--seed must be an integer >= 0 and <= 9223372036854775807, got 1180591620717411303424"),
])
def test_flags_are_bounded_to_int64_and_named(tmp_path, capsys, extra, message):
    assert main(["compare", "--preset", "smoke", "--out", str(tmp_path / "o"), "--quiet", *extra]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_config_integers_are_bounded_to_int64(tmp_path):
    with pytest.raises(ConfigError, match=r"train.seed must be an integer <= 9223372036854775807 \(the int64 range\)"):
        resolve(preset="smoke", config_file=config_file(tmp_path, f"train: {{seed: {2**70}}}"))
    with pytest.raises(ConfigError, match=r"variants\[1\] \(topk2\): seed must be an integer <= 9223372036854775807"):
        resolve(preset="smoke", config_file=config_file(
            tmp_path, f"variants: [{{router: topk, options: {{jitter: 0.0}}}}, {{router: kmeans, name: topk2, "
                      f"options: {{seed: {2**64}}}}}]"))


# -- item 5: bounded YAML ----------------------------------------------------------------------------------------------

BOMB = "".join(
    [f"a: &a [{', '.join(['lol'] * 9)}]\n"]
    + [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")]
    + ["model: {d_model: *i}\n"]
)


@pytest.mark.timeout(60)
def test_yaml_bombs_devices_pipes_and_huge_files_are_refused(tmp_path):
    assert len(BOMB) < 1500  # expands to 9^9 = 387 million strings
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ConfigError, match=r"expands to more than 100,000 values \(YAML aliases"):
        resolve(preset="smoke", config_file=config_file(tmp_path, BOMB))
    # refused while counting, not after expanding (the expansion holds 387 million strings; the timeout bounds time)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200 * 1024  # KiB
    for device in ("/dev/zero", "/dev/urandom"):
        with pytest.raises(ConfigError, match=f"config file {device} is not a regular file"):
            resolve(preset="smoke", config_file=device)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opening it would block until a writer comes: it must not be opened
    with pytest.raises(ConfigError, match="is not a regular file"):
        resolve(preset="smoke", config_file=fifo)
    big = tmp_path / "big.yaml"
    big.write_text("description: '" + "x" * (2 << 20) + "'\n")
    with pytest.raises(ConfigError, match=r"is 2,097,1\d\d bytes; a configuration is at most 1,048,576 bytes"):
        resolve(preset="smoke", config_file=big)


def test_a_huge_value_is_truncated_in_the_message(tmp_path, capsys):
    path = config_file(tmp_path, "model: {d_model: '" + "9" * 500_000 + "'}\n")
    assert main(["compare", "--preset", "smoke", "--config", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 400 and "model.d_model" in err and "(500002 characters)" in err, err


# -- item 6: one-line errors ---------------------------------------------------------------------------------------------

def test_read_only_out_fails_before_loading_data(capsys, monkeypatch):
    """Root bypasses permission bits: as root, the check runs with the effective ids of an unprivileged user."""
    import routelab.compare.runner as runner

    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before --out was checked")

    monkeypatch.setattr(runner, "load_data", no_data)
    base = Path(tempfile.mkdtemp(prefix="routelab-ro-"))
    ro = base / "ro"
    ro.mkdir()
    os.chmod(base, 0o755)
    os.chmod(ro, 0o555)
    args = ["compare", "--preset", "smoke", "--routers", "topk", "--steps", "1", "--quiet"]
    resolve(preset="smoke", routers=["topk"])  # its lazy imports read root's interpreter files, before the switch
    try:
        for out, target in ((ro / "report", f"{ro} to create {ro / 'report'}"), (ro, f"{ro}")):
            if os.geteuid() == 0:
                os.setegid(65534)
                os.seteuid(65534)
            try:
                code = main([*args, "--out", str(out)])
            finally:
                if os.getuid() == 0:
                    os.seteuid(0)
                    os.setegid(0)
            err = capsys.readouterr().err
            assert code == 2, err
            assert err == f"routelab compare: error: --out: cannot write to {target} (permission denied or read-only)\n"
    finally:
        os.chmod(ro, 0o755)
        import shutil

        shutil.rmtree(base)


def test_garbled_config_yaml_on_resume_is_one_line(tmp_path, capsys, monkeypatch):
    import routelab.compare.runner as runner

    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before the resumed folder was checked")

    out = tmp_path / "report"
    out.mkdir()
    (out / ".routelab-run.json").write_text('{"routelab": "run", "command": "compare", "run": "x", "outputs": []}')
    monkeypatch.setattr(runner, "load_data", no_data)
    for garbage in (b"\xff\xfe\x00 not utf-8", b"model: [unclosed\n  - {\n"):
        (out / "config.yaml").write_bytes(garbage)
        assert main(["compare", "--preset", "smoke", "--routers", "topk", "--out", str(out), "--quiet",
                     "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"routelab compare: error: --resume: cannot read {out / 'config.yaml'} (")
        assert err.count("\n") == 1


@pytest.mark.parametrize("name", [".", "..", ".hidden", "a" * 101, "a/b", ""])
def test_variant_names_that_are_not_plain_folder_names_are_refused(tmp_path, name):
    path = config_file(tmp_path, f"variants: [{{router: topk, name: '{name}'}}]\n")
    with pytest.raises(ConfigError, match=r"variants\[0\].name must be 1-100 letters, digits and _ \. \+ -, starting "
                                          r"with a letter or digit"):
        resolve(preset="smoke", config_file=path)
    assert resolve(preset="smoke", config_file=config_file(tmp_path, f"variants: [{{router: topk, name: "
                                                                      f"'{'a' * 100}'}}]\n"))


def test_a_dtype_mismatch_names_both_dtypes():
    layer = routelab.MoELayer(16, 32, routelab.create_router("topk", d_model=16, num_experts=4, k=2))
    with pytest.raises(TypeError, match=r"MoELayer input has dtype torch.float64 but the layer's weights are "
                                        r"torch.float32; convert one"):
        layer(torch.randn(3, 16, dtype=torch.float64))
    layer(torch.randn(3, 16))

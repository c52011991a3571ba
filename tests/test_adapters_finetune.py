"""`routelab finetune` end to end on a tiny model folder: every variant trains only its adapters, on the same
batches, and the report's numbers are the ones a hand evaluation of the saved adapters gives."""

import json
import math

import pytest
import torch

from routelab.cli import main

pytest.importorskip("matplotlib")


@pytest.fixture
def model_folder(tmp_path):
    from routelab.data import Domain, tokenize_domains
    from routelab.models.io import save_model
    from routelab.models.transformer import ModelConfig, MoETransformerLM

    prose = tmp_path / "prose.txt"
    prose.write_text("The quick brown fox jumps over the lazy dog near the river bank.\n" * 300)
    code = tmp_path / "code.txt"
    code.write_text("def f(x):\n    return [i * x for i in range(10) if i % 2]\n" * 300)
    data = tokenize_domains([Domain("prose", prose.read_text(), str(prose))], vocab_size=300, cache=tmp_path / "c")
    torch.manual_seed(0)
    model = MoETransformerLM(ModelConfig(vocab_size=data.vocab_size, d_model=16, n_layers=2, n_heads=2, d_ff=16,
                                         num_experts=4, moe_every=2, max_seq_len=32))
    training = {"config": {"data": {"source": "files", "files": [str(prose)], "max_chars": 0, "val_fraction": 0.1}}}
    save_model(model, data.tokenizer, tmp_path / "m", training=training)
    return tmp_path


def test_finetune_command_reports_and_saves_adapters(model_folder, capsys):
    out = model_folder / "ft"
    rc = main(["finetune", str(model_folder / "m"), "--data", str(model_folder / "code.txt"), "--method",
               "molora,remix", "--r", "2", "--experts", "4", "--steps", "4", "--seq-len", "16", "--batch-size", "4",
               "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "results.json").read_text())
    names = [v["name"] for v in summary["variants"]]
    assert names[:2] == ["molora", "remix"] and names[2].startswith("lora-r")
    assert summary["data"]["original"][0]["name"] == "prose"  # from the model's training.json
    lora = summary["variants"][2]
    molora = summary["variants"][0]
    # The baseline's rank is the one whose parameter count is closest to molora's.
    per_rank = lora["trainable_params"] / summary["settings"]["lora_rank"]
    assert abs(lora["trainable_params"] - molora["trainable_params"]) <= per_rank / 2
    report = (out / "report.md").read_text()
    assert "| molora |" in report and (out / "expert_load.png").is_file() and (out / "val_loss.png").is_file()

    # The report's original-domain number is what the saved adapters give on the same windows.
    from routelab.adapters import load_adapters
    from routelab.adapters.finetune import evaluate, resolve_domains, tokenize_with
    from routelab.models.io import load_model

    model, tok = load_model(model_folder / "m")
    base_loss = summary["base"]["original_loss"]
    load_adapters(model, out / "variants" / "molora" / "adapters")
    model.eval()
    orig = tokenize_with(resolve_domains([str(model_folder / "prose.txt")], max_chars=10**9), tok, val_fraction=0.1)
    result = evaluate(model, orig.val_windows(seq_len=16, windows_per_domain=16), batch_size=4)
    assert math.isclose(result["val_loss"], molora["original_loss"], rel_tol=1e-6)
    assert not math.isclose(result["val_loss"], base_loss, rel_tol=1e-9)  # the adapters did change the model


def test_finetune_bad_input_is_one_line(model_folder, capsys):
    m = str(model_folder / "m")
    code = str(model_folder / "code.txt")
    cases = [
        (["--method", "molora,nope"], "--method"),
        (["--steps", "0"], "--steps"),
        (["--data", str(model_folder / "missing.txt")], "not found"),
        (["--data", "builtin:poetry"], "builtin"),
        (["--seq-len", "999"], "max_seq_len"),
    ]
    for extra, needle in cases:
        args = ["finetune", m, "--data", code, "--out", str(model_folder / "o"), "--quiet"] + extra
        if "--data" in extra:
            args = ["finetune", m, "--out", str(model_folder / "o"), "--quiet"] + extra
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, err
    assert main(["finetune", str(model_folder / "nomodel"), "--data", code, "--out", str(model_folder / "o")]) == 2
    assert "routelab finetune: error" in capsys.readouterr().err

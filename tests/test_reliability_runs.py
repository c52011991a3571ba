"""Output folders and resume (issue 17, items 1-3, 6-9): routelab deletes only what it can prove it wrote, follows
no link out of --out, refuses foreign folders, reuses results only for the same data contents."""

from __future__ import annotations

import json
import os
import shutil
import re
from pathlib import Path

import pytest

from routelab._runs import MARKER, RunFolderError, RunLayout, check_out, claim_out
from routelab.cli import main


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ROUTELAB_CACHE", str(tmp_path_factory.getbasetemp() / "routelab-cache"))


@pytest.fixture
def texts(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("".join(f"The {i}th sentence of a small English text.\n" for i in range(400)))
    b.write_text("".join(f"value_{i} = compute({i}, {i * 3})\n" for i in range(400)))
    return a, b


def compare(out, data, *more, routers="topk"):
    return main(["compare", "--preset", "smoke", "--routers", routers, "--data", *map(str, data), "--steps", "2",
                 "--out", str(out), "--quiet", *more])


def val_losses(out):
    return {v["name"]: v["val_loss"] for v in json.loads((Path(out) / "results.json").read_text())["variants"]}


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


# -- item 1: results are keyed on the data's contents, not its file names -------------------------------------------

def test_resume_retrains_when_a_data_file_changed_under_the_same_name(tmp_path, texts, capsys):
    a, b = texts
    out, fresh = tmp_path / "report", tmp_path / "fresh"
    assert compare(out, texts) == 0
    old = val_losses(out)
    a.write_text("".join(f"An entirely different line number {i}, with other words.\n" for i in range(400)))
    assert compare(fresh, texts) == 0  # the expected numbers for the new contents, in an untouched folder
    assert val_losses(fresh) != old
    capsys.readouterr()
    assert compare(out, texts, "--resume") == 0
    assert val_losses(out) == val_losses(fresh)
    assert "computed with a different configuration; retraining" in capsys.readouterr().out


def test_content_key_covers_every_domain_text_and_the_tokenizer(tmp_path):
    from routelab.data.corpus import Domain
    from routelab.data.dataset import tokenize_domains

    text = "".join(f"line {i} of the text\n" for i in range(300))
    base = tokenize_domains([Domain("a", text, "x")], vocab_size=300, cache=tmp_path)
    same = tokenize_domains([Domain("a", text, "elsewhere")], vocab_size=300, cache=tmp_path)
    assert base.content_key == same.content_key  # where the text came from does not matter
    changed_val = tokenize_domains([Domain("a", text[:-5] + "zzzz\n", "x")], vocab_size=300, cache=tmp_path)
    other_vocab = tokenize_domains([Domain("a", text, "x")], vocab_size=258, cache=tmp_path)
    renamed = tokenize_domains([Domain("b", text, "x")], vocab_size=300, cache=tmp_path)
    keys = {base.content_key, changed_val.content_key, other_vocab.content_key, renamed.content_key}
    assert len(keys) == 4


# -- item 2: --out rules ---------------------------------------------------------------------------------------------

def test_a_rerun_deletes_only_what_routelab_wrote(tmp_path, texts, capsys):
    out = tmp_path / "report"
    assert compare(out, texts, routers="topk,hash") == 0
    assert json.loads((out / MARKER).read_text())["command"] == "compare"
    # the user's files beside and inside the run, and a folder under variants/ that routelab did not create
    (out / "notes.md").write_text("mine")
    (out / "variants" / "topk" / "notes.txt").write_text("mine too")
    (out / "variants" / "myexp").mkdir()
    for name in ("notes.txt", "metrics.jsonl", "result.json", "checkpoint.json"):
        (out / "variants" / "myexp" / name).write_text(f"user's {name}")
    assert compare(out, texts, routers="topk") == 0  # fresh run: hash is no longer part of it
    assert (out / "notes.md").read_text() == "mine"
    assert (out / "variants" / "topk" / "notes.txt").read_text() == "mine too"
    assert tree(out / "variants" / "myexp") == {n: f"user's {n}" for n in
                                                ("checkpoint.json", "metrics.jsonl", "notes.txt", "result.json")}
    assert not (out / "variants" / "hash").exists()  # routelab's own earlier variant folder, emptied and removed
    assert list(val_losses(out)) == ["topk"]


def test_a_non_empty_foreign_folder_is_refused_unless_overwrite(tmp_path, texts, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my own report")
    (out / "thesis.tex").write_text("chapter 1")
    assert compare(out, texts) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"routelab compare: error: --out .*mine is not empty and is not a routelab run; .*"
                        r"--overwrite.*\n", err), err
    assert tree(out) == {"report.md": "my own report", "thesis.tex": "chapter 1"}
    assert compare(out, texts, "--overwrite") == 0
    assert (out / "thesis.tex").read_text() == "chapter 1" and "| topk |" in (out / "report.md").read_text()
    # a foreign, non-empty folder where a variant goes is refused too
    other = tmp_path / "other"
    (other / "variants" / "topk").mkdir(parents=True)
    (other / "variants" / "topk" / "checkpoint.json").write_text("{}")
    (other / MARKER).write_text(json.dumps({"routelab": "run", "command": "compare", "run": "x", "outputs": []}))
    assert compare(other, texts) == 2
    assert "variants (inside --out) is not empty and is not a routelab run" in capsys.readouterr().err
    assert (other / "variants" / "topk" / "checkpoint.json").read_text() == "{}"


def test_no_symlink_below_out_is_followed(tmp_path, texts, capsys):
    out = tmp_path / "report"
    assert compare(out, texts, routers="topk,hash") == 0
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "topk").mkdir(parents=True)
    (elsewhere / "topk" / "metrics.jsonl").write_text("precious")
    (elsewhere / "metrics.jsonl").write_text("precious too")
    before = tree(elsewhere)

    hash_dir = out / "variants" / "hash"
    shutil.rmtree(hash_dir)  # its files and its model/ folder
    hash_dir.symlink_to(elsewhere, target_is_directory=True)  # a variant folder that is a link
    assert compare(out, texts, routers="topk,hash") == 2
    assert "variants/hash is a symbolic link" in capsys.readouterr().err
    assert compare(out, texts, "--resume", routers="topk,hash") == 2
    hash_dir.unlink()

    variants = out / "variants"
    os.rename(variants, tmp_path / "old-variants")
    variants.symlink_to(elsewhere, target_is_directory=True)  # variants/ itself is a link
    assert compare(out, texts, routers="topk,hash") == 2
    assert "variants is a symbolic link" in capsys.readouterr().err
    variants.unlink()
    (out / "report.md").unlink()
    (out / "report.md").symlink_to(elsewhere / "metrics.jsonl")  # an output file that is a link
    assert compare(out, texts, "--overwrite", routers="topk,hash") == 2
    assert "report.md is a symbolic link" in capsys.readouterr().err
    assert tree(elsewhere) == before


def test_an_interrupted_rerun_leaves_no_stale_report_and_says_how_to_continue(tmp_path, texts, monkeypatch, capsys):
    import routelab.compare.runner as runner

    out = tmp_path / "report"
    assert compare(out, texts, routers="topk,hash") == 0
    real = runner.run_variant

    def ctrl_c_in_hash(cfg, variant, *args, **kwargs):
        if variant["name"] == "hash":
            raise KeyboardInterrupt
        return real(cfg, variant, *args, **kwargs)

    monkeypatch.setattr(runner, "run_variant", ctrl_c_in_hash)
    capsys.readouterr()
    assert main(["compare", "--preset", "smoke", "--routers", "topk,hash", "--data", *map(str, texts), "--steps",
                 "3", "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == f"routelab compare: interrupted; continue with --resume (same options, --out {out})"
    assert not (out / "report.md").exists() and not (out / "results.json").exists()
    assert not (out / "variants" / "hash" / "result.json").exists()
    assert "steps: 3" in (out / "config.yaml").read_text()


# -- item 3: empty values are errors, not defaults ---------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--out", ""], "--out must name a folder, got an empty string"),
    (["--out", "  "], "--out must name a folder, got an empty string"),
    (["--routers", ","], "--routers needs at least one router or variant name, got ','"),
    (["--routers", " , "], "--routers needs at least one router or variant name"),
])
def test_empty_out_and_routers_are_errors(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--preset", "smoke", "--steps", "2", "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("routelab compare: error: ") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing written, in particular not runs/compare-smoke


# -- the module's API, for a second command ---------------------------------------------------------------------------

def test_run_folder_api_for_another_command(tmp_path):
    layout = RunLayout("train", {"": ("metrics.jsonl", "checkpoint-*.safetensors")})
    out = tmp_path / "run"
    check_out(out, layout)  # a new folder is fine, and nothing is created by checking
    assert not out.exists()
    run_id = claim_out(out, layout, resume=False)
    (out / "metrics.jsonl").write_text("1")
    (out / "checkpoint-7.safetensors").write_text("w")
    (out / "keep.txt").write_text("k")
    (out / ".metrics.jsonl.0123456789abcdef.tmp").write_text("half")  # a kill between write and rename
    assert claim_out(out, layout, resume=True) == run_id
    assert sorted(os.listdir(out)) == sorted([MARKER, "metrics.jsonl", "checkpoint-7.safetensors", "keep.txt"])
    assert claim_out(out, layout, resume=False) != run_id
    assert sorted(os.listdir(out)) == sorted([MARKER, "keep.txt"])
    with pytest.raises(RunFolderError, match="holds a `routelab train` run, not a `routelab compare` one"):
        check_out(out, RunLayout("compare", {"": ("report.md",)}))
    with pytest.raises(RunFolderError, match="--out must name a folder, got an empty string"):
        check_out("", layout)

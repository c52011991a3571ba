"""Corpora, the local BPE tokenizer and its cache, splits and batches."""

from __future__ import annotations

import socket

import pytest
import torch

from routelab.data import (
    DataError,
    Domain,
    builtin_corpus,
    file_corpus,
    load_or_train_tokenizer,
    split_text,
    tokenize_domains,
    train_tokenizer,
)
from routelab.data import tokenizer as tokenizer_module


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_builtin_corpus_has_both_domains_without_network(no_network):
    domains = builtin_corpus(max_chars=50_000)
    assert [d.name for d in domains] == ["prose", "code"]
    prose, code = domains
    assert len(prose.text) > 10_000 and len(code.text) > 10_000
    assert "def " in code.text and "import " in code.text
    assert prose.text.count(" the ") > 20  # English prose
    assert builtin_corpus(max_chars=50_000) == domains  # deterministic


def test_tokenizer_round_trips_any_text():
    texts = ["The quick brown fox jumps over the lazy dog.\n" * 50, "def f(x):\n    return x + 1\n" * 50]
    tok = train_tokenizer(texts, vocab_size=300)
    assert tok.get_vocab_size() == 300
    for text in ["hello world", "  two  spaces\n\ttab", "ünïcödé — ≠ 日本語 🙂", "def f(x):\n    return x\n", ""]:
        assert tok.decode(tok.encode(text).ids) == text


def test_tokenizer_cache_is_reused(tmp_path, monkeypatch):
    texts = ["alpha beta gamma delta\n" * 30]
    tok1, key1, cached1 = load_or_train_tokenizer(texts, vocab_size=280, cache=tmp_path)
    assert not cached1 and (tmp_path / "tokenizers" / f"bpe-{key1}.json").is_file()

    def fail(*args, **kwargs):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(tokenizer_module, "train_tokenizer", fail)
    tok2, key2, cached2 = load_or_train_tokenizer(texts, vocab_size=280, cache=tmp_path)
    assert cached2 and key2 == key1 and tok2.get_vocab() == tok1.get_vocab()
    assert tokenizer_module.corpus_hash(texts, vocab_size=290) != key1  # settings are part of the key


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ROUTELAB_CACHE", str(tmp_path / "c"))
    assert tokenizer_module.cache_dir() == tmp_path / "c"


def test_file_corpus_errors(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("some text\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="not found: .*missing.txt"):
        file_corpus([good, tmp_path / "missing.txt"])
    with pytest.raises(DataError, match="empty: .*empty.txt"):
        file_corpus([empty])
    with pytest.raises(DataError, match="not valid UTF-8"):
        file_corpus([binary])
    with pytest.raises(DataError, match="not a regular file"):
        file_corpus([tmp_path])
    same = tmp_path / "sub"
    same.mkdir()
    (same / "good.txt").write_text("other\n")
    assert [d.name for d in file_corpus([good, same / "good.txt"])] == ["good", "good-2"]


def test_split_batches_and_windows(tmp_path):
    text_a = "".join(f"line {i} of the first domain\n" for i in range(400))
    text_b = "".join(f"x{i} = {i} * 2\n" for i in range(400))
    train, val = split_text(text_a, 0.1)
    assert train + val == text_a and train.endswith("\n") and 0.05 < len(val) / len(text_a) < 0.15
    data = tokenize_domains([Domain("a", text_a, "a"), Domain("b", text_b, "b")], vocab_size=300, cache=tmp_path)
    assert data.names == ["a", "b"] and data.vocab_size == 300
    x1, y1 = data.batch(3, batch_size=4, seq_len=16, seed=0)
    x2, y2 = data.batch(3, batch_size=4, seq_len=16, seed=0)
    assert x1.shape == (4, 16) and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one
    assert not torch.equal(data.batch(4, batch_size=4, seq_len=16, seed=0)[0], x1)
    windows = data.val_windows(seq_len=16, windows_per_domain=3)
    assert [name for name, _, _ in windows] == ["a", "b"] and windows[0][1].shape == (3, 16)
    with pytest.raises(DataError, match="fewer than one window"):
        data.check_windows(10_000)

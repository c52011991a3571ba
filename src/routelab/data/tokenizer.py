"""A byte-level BPE tokenizer trained locally with the `tokenizers` library, cached by the corpus' hash.

Byte-level: every string round-trips exactly (decode(encode(text)) == text), whatever its characters. The trained
tokenizer and the encoded token arrays are cached under the user cache directory (`$ROUTELAB_CACHE`, else
`$XDG_CACHE_HOME/routelab`, else the platform's cache folder), keyed by a hash of the training text and the settings,
so a second run with the same corpus trains nothing.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from routelab._atomic import atomic_write_text

TOKENIZER_FORMAT = 1  # bump when the training recipe changes, so old caches are not reused
SPECIAL_TOKENS = ["<|endoftext|>"]


def cache_dir() -> Path:
    """The routelab cache folder (created on demand by the writers)."""
    if os.environ.get("ROUTELAB_CACHE"):
        return Path(os.environ["ROUTELAB_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "routelab"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "routelab"
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "routelab" / "Cache"
    return Path.home() / ".cache" / "routelab"


def corpus_hash(texts: Iterable[str], *, vocab_size: int) -> str:
    h = hashlib.sha256(f"routelab-bpe-v{TOKENIZER_FORMAT}|vocab={vocab_size}".encode())
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:24]


def train_tokenizer(texts: list[str], *, vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts` (deterministic for a given input)."""
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
        minimum = 256 + len(SPECIAL_TOKENS)
        raise ValueError(f"vocab_size must be an integer >= {minimum} (the byte alphabet), got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_chunks(texts), trainer=trainer)
    return tok


def load_or_train_tokenizer(
    texts: list[str], *, vocab_size: int = 4096, cache: Path | None = None
) -> tuple[Tokenizer, str, bool]:
    """(tokenizer, key, cached): the cached tokenizer for this corpus, or a newly trained one saved to the cache."""
    key = corpus_hash(texts, vocab_size=vocab_size)
    path = (cache or cache_dir()) / "tokenizers" / f"bpe-{key}.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path)), key, True
        except Exception:  # a corrupt cache entry is retrained, not trusted
            pass
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    atomic_write_text(path, tok.to_str())
    return tok, key, False


def encode(tok: Tokenizer, text: str, *, chunk_chars: int = 1 << 16) -> list[int]:
    """Token ids of `text`, encoded in chunks that end after a newline (batch-encoded in parallel; the result is a
    deterministic function of the text)."""
    ids: list[int] = []
    for enc in tok.encode_batch(list(_chunks([text], chunk_chars)), add_special_tokens=False):
        ids.extend(enc.ids)
    return ids


def _chunks(texts: Iterable[str], size: int = 1 << 16) -> Iterable[str]:
    for text in texts:
        start = 0
        while start < len(text):
            end = min(len(text), start + size)
            if end < len(text):
                cut = text.rfind("\n", start, end)
                end = cut + 1 if cut > start else end
            yield text[start:end]
            start = end

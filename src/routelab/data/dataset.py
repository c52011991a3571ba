"""Token streams per domain, split into train and validation, and the batches drawn from them.

Each domain's text is split by characters (the first `1 - val_fraction` for training, the rest for validation, cut
at a newline); the tokenizer is trained on the training parts only. Training batches are random contiguous windows:
row r of the batch at step s comes from domain r mod n_domains, at an offset drawn from a generator seeded by
(seed, s) alone, so the batch order is fixed by the seed and a resumed run sees exactly the batches it would have
seen. Validation uses fixed evenly spaced windows of each domain's validation part.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from routelab.data.corpus import DataError, Domain
from routelab._atomic import atomic_write_bytes
from routelab.data.tokenizer import cache_dir, encode, load_or_train_tokenizer


@dataclass
class DomainTokens:
    name: str
    source: str
    train: Tensor  # LongTensor [N_train]
    val: Tensor  # LongTensor [N_val]


@dataclass
class TokenData:
    """Tokenized domains plus the tokenizer; `batch(step, ...)` and `val_windows(...)` give model inputs."""

    domains: list[DomainTokens]
    tokenizer: object
    vocab_size: int
    tokenizer_key: str
    tokenizer_cached: bool
    # A digest of what the tokens are made of: every domain's name and text (both parts) and the tokenizer itself.
    # Results are reused (resume) only under the same content_key, whatever the data files are called.
    content_key: str = ""

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]

    def check_windows(self, seq_len: int) -> None:
        """Raise a DataError naming the domain whose train or validation part is shorter than one window."""
        for d in self.domains:
            for part, ids in (("training", d.train), ("validation", d.val)):
                if ids.numel() < seq_len + 1:
                    raise DataError(
                        f"domain {d.name!r} ({d.source}) has {ids.numel()} {part} tokens, fewer than one window of "
                        f"seq_len+1={seq_len + 1}; give more text or a shorter seq_len"
                    )

    def batch(self, step: int, *, batch_size: int, seq_len: int, seed: int) -> tuple[Tensor, Tensor]:
        """(inputs, targets), each LongTensor [batch_size, seq_len], a function of (seed, step) only."""
        gen = torch.Generator().manual_seed(_mix(seed, step))
        rows = []
        for r in range(batch_size):
            ids = self.domains[r % len(self.domains)].train
            start = int(torch.randint(0, ids.numel() - seq_len, (1,), generator=gen))
            rows.append(ids[start : start + seq_len + 1])
        block = torch.stack(rows)
        return block[:, :-1], block[:, 1:]

    def val_windows(self, *, seq_len: int, windows_per_domain: int) -> list[tuple[str, Tensor, Tensor]]:
        """[(domain, inputs [n, seq_len], targets [n, seq_len])]: up to `windows_per_domain` evenly spaced windows."""
        out = []
        for d in self.domains:
            n_max = max(1, (d.val.numel() - 1) // seq_len)
            n = min(windows_per_domain, n_max)
            span = d.val.numel() - seq_len - 1
            starts = [round(i * span / max(1, n - 1)) for i in range(n)] if n > 1 else [0]
            block = torch.stack([d.val[s : s + seq_len + 1] for s in starts])
            out.append((d.name, block[:, :-1], block[:, 1:]))
        return out


def _mix(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): the last `val_fraction` of the characters, cut after a newline when there is one nearby."""
    cut = int(len(text) * (1.0 - val_fraction))
    nl = text.rfind("\n", 0, cut)
    if nl > cut - 10_000 and nl > 0:
        cut = nl + 1
    return text[:cut], text[cut:]


def tokenize_domains(
    domains: list[Domain], *, vocab_size: int = 4096, val_fraction: float = 0.1, cache: Path | None = None
) -> TokenData:
    """Train (or load) the tokenizer on the domains' training parts and encode every part (cached too)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    parts = [split_text(d.text, val_fraction) for d in domains]
    tok, key, cached = load_or_train_tokenizer([train for train, _ in parts], vocab_size=vocab_size, cache=cache)
    out = []
    content = hashlib.sha256(b"routelab-data-v1")
    content.update(hashlib.sha256(tok.to_str().encode("utf-8")).digest())
    for d, (train, val) in zip(domains, parts):
        train_ids, val_ids = _encode_cached(tok, key, train, cache), _encode_cached(tok, key, val, cache)
        out.append(DomainTokens(d.name, d.source, train_ids, val_ids))
        for piece in (d.name, train, val):
            data = piece.encode("utf-8")
            content.update(len(data).to_bytes(8, "little"))
            content.update(data)
    return TokenData(out, tok, tok.get_vocab_size(), key, cached, content.hexdigest())


def _encode_cached(tok, key: str, text: str, cache: Path | None) -> Tensor:
    text_key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]
    path = (cache or cache_dir()) / "tokens" / f"{key}-{text_key}.npy"
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
        except (OSError, ValueError):
            pass
    ids = np.asarray(encode(tok, text), dtype=np.int32)
    buf = io.BytesIO()
    np.save(buf, ids, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
    return torch.from_numpy(ids.astype(np.int64))

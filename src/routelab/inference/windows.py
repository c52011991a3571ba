"""Text → token windows for analysis and sweeps: one domain per file (or the built-in corpus's held-out part),
tokenized with the model's tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

BUILTIN_MAX_CHARS = 1_000_000  # as `routelab compare`'s default preset cuts the built-in corpus
BUILTIN_VAL_FRACTION = 0.1


def text_windows(
    paths: list[str | Path] | None, tokenizer, *, seq_len: int, max_windows: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """{domain: (evaluation [n, seq_len], calibration [m, seq_len])} token windows.

    paths: UTF-8 files, one domain each, named after the file's stem (as `routelab compare` names file domains); or
    None for the built-in corpus (prose, code), of which only the validation part is used — the last tenth of each
    domain's first million characters, which training on the built-in corpus holds out.
    A domain's tokens are cut into consecutive windows; evaluation takes the even-numbered ones and calibration the
    odd-numbered ones (each at most `max_windows`), so the two sets never overlap. A domain of a single window gives
    it to both (calibration then sees the evaluation text). Raises a DataError naming the file when it is missing,
    not UTF-8, empty, or shorter than one window.
    """
    from routelab.data.corpus import DataError, Domain, builtin_corpus, file_corpus
    from routelab.data.dataset import split_text
    from routelab.data.tokenizer import encode

    if paths is None:
        domains = [Domain(d.name, split_text(d.text, BUILTIN_VAL_FRACTION)[1], f"validation part of the {d.source}")
                   for d in builtin_corpus(max_chars=BUILTIN_MAX_CHARS)]
    else:
        domains = file_corpus(list(paths))
    out = {}
    for domain in domains:
        ids = torch.tensor(encode(tokenizer, domain.text), dtype=torch.long)
        n = ids.numel() // seq_len
        if n < 1:
            raise DataError(f"{domain.source}: {ids.numel()} tokens, fewer than one window of {seq_len} tokens")
        windows = ids[: n * seq_len].view(n, seq_len)
        out[domain.name] = (windows, windows) if n == 1 else (windows[0::2][:max_windows], windows[1::2][:max_windows])
    return out

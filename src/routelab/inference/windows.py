"""Text files → token windows for analysis and sweeps: one domain per file, tokenized with the model's tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def text_windows(
    paths: list[str | Path], tokenizer, *, seq_len: int, max_windows: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """{domain: (evaluation [n, seq_len], calibration [m, seq_len])} token windows, one domain per UTF-8 file,
    named after the file's stem (as `routelab compare` names file domains).

    A file's tokens are cut into consecutive windows; evaluation takes the even-numbered ones and calibration the
    odd-numbered ones (each at most `max_windows`), so the two sets never overlap. A file of a single window gives it
    to both (calibration then sees the evaluation text). Raises a DataError naming the file when it is missing, not
    UTF-8, empty, or shorter than one window.
    """
    from routelab.data.corpus import DataError, file_corpus
    from routelab.data.tokenizer import encode

    out = {}
    for domain in file_corpus(list(paths)):
        ids = torch.tensor(encode(tokenizer, domain.text), dtype=torch.long)
        n = ids.numel() // seq_len
        if n < 1:
            raise DataError(f"{domain.source}: {ids.numel()} tokens, fewer than one window of {seq_len} tokens")
        windows = ids[: n * seq_len].view(n, seq_len)
        out[domain.name] = (windows, windows) if n == 1 else (windows[0::2][:max_windows], windows[1::2][:max_windows])
    return out

"""The one loop over expert groups: every per-expert computation in routelab walks expert-contiguous rows with it.

Shape legend: S rows (sorted by expert), E experts, N rows of one expert group.
"""

from __future__ import annotations

from collections.abc import Iterator


def expert_groups(counts: list[int]) -> Iterator[tuple[int, int, int]]:
    """(expert, start, end) of every non-empty group of expert-contiguous rows, in expert order.

    counts[e] is the number of rows of expert e; the rows of expert e are rows[start:end]. Empty experts are
    skipped, so a bank whose weights are fetched on demand only ever touches experts that have rows.
    """
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n

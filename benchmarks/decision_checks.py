"""Cost of RoutingDecision's validation on the hot path (issue 17): the index range checks it always had against
the current checks (indices in range, weights finite and >= 0, sizes ints), relative to one top-k MoELayer forward.

    PYTHONPATH=src python benchmarks/decision_checks.py

The variants run interleaved, round-robin, in one process; each figure is the median over rounds. Ratios, not
times, are the result (the machine may be shared).
"""

from __future__ import annotations

import statistics
import time

import torch

import routelab
from routelab.routing.base import RoutingDecision, _check_assignments


def index_checks_only(token_S, num_tokens, expert_S, num_experts, weight_S):
    """What the validation did before (two ranges, four host syncs); kept here as the baseline."""
    for index, upper in ((token_S, num_tokens), (expert_S, num_experts)):
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= upper:
            raise ValueError("out of range")


def timed(fn, reps):
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("T     E   k   old checks µs  new checks µs  new/old  (new-old)/layer forward")
    for T, E, k, D, F in ((512, 8, 2, 256, 512), (4096, 64, 8, 512, 256)):
        layer = routelab.MoELayer(D, F, routelab.create_router("topk", d_model=D, num_experts=E, k=k))
        x = torch.randn(T, D)
        dec = layer.router(x)
        args = (dec.token_index, T, dec.expert_index, E, dec.weight)
        old, new, fwd = [], [], []
        for _ in range(9):
            old.append(timed(lambda: index_checks_only(*args), 50))
            new.append(timed(lambda: _check_assignments(*args), 50))
            with torch.no_grad():
                fwd.append(timed(lambda: layer(x), 3))
        o, n, f = statistics.median(old), statistics.median(new), statistics.median(fwd)
        print(f"{T:<5} {E:<3} {k:<3} {o * 1e6:13.1f} {n * 1e6:14.1f} {n / o:8.2f} {(n - o) / f:12.2%}")
    assert RoutingDecision  # the checks above are the ones RoutingDecision.__post_init__ runs


if __name__ == "__main__":
    main()

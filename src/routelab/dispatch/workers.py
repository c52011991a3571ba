"""Whole experts per thread: the expert groups of one call cut into contiguous runs, each computed on its own thread.

Why (benchmarks/layer.py --threads 1,2): with two intra-op threads every small per-expert matmul of a fine-grained
MoE layer is split across both, and the gathers, scatter-adds and activations of a few hundred rows run on one
thread anyway (below ATen's parallel grain), so the layer gained far less from a second core than a dense MLP does,
and under load the per-op thread barriers cost more still. Here the groups are cut into W contiguous runs of about
S/W rows; the first run is computed on the calling thread and the others on pool threads, all with one intra-op
thread, and the caller's thread count is restored when every run is done.

Used by the loop kernel (`dispatch/routed_swiglu.py`: training, large forwards). Not by the grouped kernel of
decode-size forwards: there the work is streaming the touched experts' weights, which the intra-op threads of each
small matmul already share, and the split measured slower (benchmarks/layer.py's decode shapes, 2 threads).

Shape legend: S rows (sorted by expert).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from routelab.dispatch.groups import expert_groups


def split_groups(group_sizes: list[int], workers: int) -> list[list[tuple[int, int, int]]]:
    """The non-empty (expert, start, end) groups cut into at most `workers` contiguous runs of about equal rows: a
    group opens the next run when its middle row lies past that run's share of the rows (so eight equal groups go
    four and four, not five and three)."""
    groups = list(expert_groups(group_sizes))
    total = groups[-1][2] if groups else 0
    runs: list[list[tuple[int, int, int]]] = [[]]
    for group in groups:
        if runs[-1] and len(runs) < workers and group[1] + group[2] >= 2 * total * len(runs) / workers:
            runs.append([])
        runs[-1].append(group)
    return runs


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    """In a forked child: the parent's pool threads do not exist here (a task handed to them would wait forever)."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def in_parallel(fn, runs, *args):
    """fn(run, *args) for every run, the first on this thread and the others on pool threads, each with one intra-op
    thread; returns the results in run order."""
    if len(runs) == 1:
        return [fn(runs[0], *args)]
    global _pool, _pool_size
    with _pool_lock:
        if _pool_size < len(runs) - 1:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool_size = len(runs) - 1
            _pool = ThreadPoolExecutor(_pool_size, thread_name_prefix="routelab-experts",
                                       initializer=torch.set_num_threads, initargs=(1,))
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()  # grad mode is per thread: hand it on

    def on_worker(run):
        with torch.set_grad_enabled(grad):
            return fn(run, *args)

    futures = [_pool.submit(on_worker, run) for run in runs[1:]]
    torch.set_num_threads(1)
    try:  # restored only after every worker is done: MKL's thread count is one setting for the whole process
        first = fn(runs[0], *args)
        return [first] + [f.result() for f in futures]
    finally:
        torch.set_num_threads(threads)


def summed(parts: list[torch.Tensor]) -> torch.Tensor:
    """The runs' partial outputs added in run order (into the first)."""
    total = parts[0]
    for part in parts[1:]:
        total = total.add_(part)
    return total

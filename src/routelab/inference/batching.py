"""Expert-aware batching: group queued requests so that each batch touches few distinct experts.

Papers: ExpertFlow: Optimized Expert Activation and Token Allocation for Efficient Mixture-of-Experts Inference
(He et al., 2024) and Read-ME (Cai et al., NeurIPS 2024), which batch requests by their (pre-gated) expert choices.

Shape legend: R requests, L MoE layers, E experts.

A request is known by the experts its prompt prefix routes to (`request_experts`: a boolean [R, L, E] from the
model's own routing). A schedule splits the queue into batches of at most `batch_size`; its objective is the sum
over batches and layers of the distinct experts the batch touches — the experts that must be resident (and, from a
cold cache, loaded) to run it. FIFO batching takes the queue in arrival order.

Scheduler ("greedy"; our reconstruction, not either paper's exact algorithm): each batch starts with the oldest
request still waiting (so no request waits forever), then repeatedly takes the waiting request that adds the fewest
new experts (ties: the older one), up to `batch_size` (a "lookahead" bounds how far down the queue it looks). Then
pairwise swaps between batches that lower the objective are applied until none does (bounded passes). If the
result is not better than FIFO on the objective, FIFO is returned: the scheduler is never worse than FIFO on its own
objective, and every request is scheduled exactly once. The swap pass is skipped on queues where it would take more
than ~200k evaluations.

Waiting-time cost: a request's delay is the index of its batch minus the index of its FIFO batch (in batches; < 0
means served earlier); the plan reports the max and mean delay. Bytes moved are the distinct experts times each
layer's expert size (cold cache per batch), and, with a capacity, the bytes an LRU cache of that capacity loads
when the batches run one after another (`inference/cache.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from routelab._checks import check_choice, check_int

METHODS = ("greedy", "fifo")


@dataclass(frozen=True)
class BatchPlan:
    """batches: request indices per batch, in running order. distinct[b]: distinct experts batch b touches, summed
    over layers; fifo_distinct likewise for FIFO. delays: per request, batch index − FIFO batch index."""

    batches: list[list[int]]
    distinct: list[int]
    fifo_distinct: list[int]
    delays: list[int]
    method: str
    bytes_moved: int
    fifo_bytes_moved: int

    @property
    def objective(self) -> int:
        return sum(self.distinct)

    @property
    def fifo_objective(self) -> int:
        return sum(self.fifo_distinct)

    @property
    def max_delay(self) -> int:
        return max(self.delays, default=0)

    @property
    def mean_delay(self) -> float:
        return float(np.mean(self.delays)) if self.delays else 0.0


def _batch_cost(used_RLE: np.ndarray, batch: Sequence[int]) -> int:
    return int(used_RLE[list(batch)].any(0).sum()) if len(batch) else 0


def fifo_batches(num_requests: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, num_requests))) for i in range(0, num_requests, batch_size)]


def _greedy(used_RLE: np.ndarray, batch_size: int, lookahead: int) -> list[list[int]]:
    R = len(used_RLE)
    flat = used_RLE.reshape(R, -1)
    waiting = list(range(R))
    batches = []
    while waiting:
        batch = [waiting.pop(0)]
        union = flat[batch[0]].copy()
        while len(batch) < batch_size and waiting:
            window = waiting[:lookahead]
            added = (flat[window] & ~union).sum(1)
            pick = window[int(np.argmin(added))]  # argmin takes the first (oldest) on ties
            waiting.remove(pick)
            batch.append(pick)
            union |= flat[pick]
        batches.append(batch)
    return batches


def _improve_by_swaps(used_RLE: np.ndarray, batches: list[list[int]], max_passes: int) -> list[list[int]]:
    batches = [list(b) for b in batches]
    cost = [_batch_cost(used_RLE, b) for b in batches]
    for _ in range(max_passes):
        improved = False
        for a in range(len(batches)):
            for b in range(a + 1, len(batches)):
                for i in range(len(batches[a])):
                    for j in range(len(batches[b])):
                        ba, bb = list(batches[a]), list(batches[b])
                        ba[i], bb[j] = bb[j], ba[i]
                        ca, cb = _batch_cost(used_RLE, ba), _batch_cost(used_RLE, bb)
                        if ca + cb < cost[a] + cost[b]:
                            batches[a], batches[b], cost[a], cost[b] = ba, bb, ca, cb
                            improved = True
        if not improved:
            break
    # keep each batch's members in arrival order (the running order of batches is the scheduler's)
    return [sorted(b) for b in batches]


def schedule_batches(
    used_RLE: np.ndarray | Tensor,
    batch_size: int,
    *,
    method: str = "greedy",
    lookahead: int = 64,
    swap_passes: int = 2,
    expert_bytes: Sequence[int] | None = None,
    capacity: int | None = None,
) -> BatchPlan:
    """Group R requests (used_RLE: bool [R, L, E], the experts each request's prompt prefix touches) into batches.

    method "greedy" (see the module docstring) or "fifo"; lookahead: how many waiting requests the greedy step
    considers; swap_passes: passes of the pairwise-swap improvement (0 disables). expert_bytes: bytes of one expert per
    layer (default 1, so bytes count experts); capacity: also simulate an LRU cache of that many experts per layer
    over the batches, and report its bytes instead of the cold-cache bytes.
    """
    used = np.asarray(used_RLE.cpu().numpy() if isinstance(used_RLE, Tensor) else used_RLE)
    if used.ndim != 3 or used.dtype != np.bool_:
        raise ValueError(f"used_RLE must be a boolean array [requests, layers, experts], got {used.dtype} {used.shape}")
    check_int("batch_size", batch_size, 1)
    check_choice("method", method, METHODS)
    check_int("lookahead", lookahead, 1)
    check_int("swap_passes", swap_passes, 0)
    R, L, E = used.shape
    nbytes = np.ones(L, dtype=np.int64) if expert_bytes is None else np.asarray(expert_bytes, dtype=np.int64)
    if nbytes.shape != (L,):
        raise ValueError(f"expert_bytes must give one size per layer ({L}), got {len(nbytes)}")
    if capacity is not None:
        check_int("capacity", capacity, 1)

    fifo = fifo_batches(R, batch_size)
    batches = fifo
    if method == "greedy" and R:
        candidate = _greedy(used, batch_size, lookahead)
        # The swap pass costs (batches · batch_size)² / 2 evaluations; past ~200k it is skipped (greedy only).
        if swap_passes and (R * batch_size) ** 2 // 2 <= 200_000:
            candidate = _improve_by_swaps(used, candidate, swap_passes)
        if sum(_batch_cost(used, b) for b in candidate) < sum(_batch_cost(used, b) for b in fifo):
            batches = candidate

    def bytes_of(plan: list[list[int]]) -> int:
        if capacity is None:
            return int(sum((used[b].any(0).sum(1) * nbytes).sum() for b in plan))
        return _lru_bytes(used, plan, capacity, nbytes)

    position = {r: i for i, b in enumerate(batches) for r in b}
    delays = [position[r] - r // batch_size for r in range(R)]
    return BatchPlan(
        batches=batches,
        distinct=[_batch_cost(used, b) for b in batches],
        fifo_distinct=[_batch_cost(used, b) for b in fifo],
        delays=delays,
        method=method if batches is not fifo else "fifo",
        bytes_moved=bytes_of(batches),
        fifo_bytes_moved=bytes_of(fifo),
    )


def _lru_bytes(used_RLE: np.ndarray, plan: list[list[int]], capacity: int, nbytes: np.ndarray) -> int:
    from routelab.inference.cache import Demand, lru_sweep

    steps = np.stack([used_RLE[b].any(0) for b in plan])  # [batches, L, E]
    d = Demand(
        used=[steps[:, layer] for layer in range(steps.shape[1])],
        predicted=[None] * steps.shape[1],
        tokens_S=np.array([len(b) for b in plan]),
        expert_bytes=[int(b) for b in nbytes],
    )
    return lru_sweep(d, [capacity])[0].bytes_moved


@torch.no_grad()
def request_experts(model: nn.Module, prompts: Sequence[Sequence[int] | Tensor], *, prefix_tokens: int = 16) -> Tensor:
    """BoolTensor [R, L, E]: the experts each prompt's first `prefix_tokens` tokens route to, per MoE layer (one
    forward per prompt; the model's own routing)."""
    from routelab.inference.trace import record_trace

    check_int("prefix_tokens", prefix_tokens, 1)
    seqs = [torch.as_tensor(p, dtype=torch.long).reshape(-1)[:prefix_tokens] for p in prompts]
    trace = record_trace(model, seqs, predict=False)
    E = max(trace.num_experts)
    out = torch.zeros(len(seqs), trace.num_layers, E, dtype=torch.bool)
    seq_N = torch.as_tensor(trace.sequence_ids, dtype=torch.long)
    for layer, ids_NK in enumerate(trace.experts):
        ids = torch.as_tensor(ids_NK.astype(np.int64))
        rows, slots = (ids >= 0).nonzero(as_tuple=True)
        out[seq_N[rows], layer, ids[rows, slots]] = True
    return out

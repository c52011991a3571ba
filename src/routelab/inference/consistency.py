"""Local routing consistency: SRP and SCH, from *Not All Models Suit Expert Offloading: On Local Routing
Consistency of Mixture-of-Expert Models* (Liang et al., 2025; arXiv 2505.16056; authors' code ljcleo/moe-lrc).

Both metrics read only which experts each token used (index sets), one layer at a time, and never let a window
cross from one sequence into the next. A layer's routing over one sequence is a usage matrix `used_TE` (BoolTensor
[T, E]: token t used expert e); `usage_from_indices` builds it from [T, K] expert ids, and `usage_from_decision` from
a `RoutingDecision` of a [B, L] batch.

SRP (segment routing best performance), for segment length m: split the token stream into segments of m tokens;
in a segment, c_e is how many of its tokens used expert e. For a threshold j ∈ [1, m], predict that every expert with
c_e ≥ j serves every token of the segment. Over all segments (one global j),

    F1(j) = 2·|predicted ∩ used| / (|predicted| + |used|)        (counted in assignments)
          = 2·Σ_{c_e ≥ j} c_e / (Σ_segments len·#{e : c_e ≥ j} + Σ_e c_e)

and SRP(m) = max_j F1(j). It is 1 at m = 1 and for routing that is constant within segments. Segments are
consecutive (stride m; the last one may be shorter); `stride < m` gives the authors' sliding windows instead (every
full window of m tokens at that stride).

SCH (segment cache best hit rate), for m and a cache of c experts: before token t, the cache holds the c experts
ranked highest among those used before t, by their number of uses in the next m tokens [t, t+m) (the oracle
knows the future), ties by the most recent use, then by lower expert id. An activation of token t hits when its
expert is in the cache; an expert's first use always misses. SCH = hits / activations. (The authors' code counts
the first uses of the first c distinct experts as hits, a cold start that vanishes on long streams; routelab
counts them as misses.) SCH never decreases as c grows.

Shape legend: T tokens of one sequence, E experts, K slots, W windows, J thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from routelab.routing.base import RoutingDecision

__all__ = ["sch", "srp", "usage_from_decision", "usage_from_indices"]


def usage_from_indices(expert_TK: Tensor, num_experts: int) -> Tensor:
    """BoolTensor [T, E] from expert ids [T, K] (entries < 0 are empty slots, for tokens with fewer experts)."""
    if expert_TK.dim() != 2:
        raise ValueError(f"expert_TK must be [T, K] expert ids, got shape {tuple(expert_TK.shape)}")
    if expert_TK.numel() and int(expert_TK.max()) >= num_experts:
        raise ValueError(f"expert_TK holds expert id {int(expert_TK.max())}, outside [0, num_experts={num_experts})")
    used_TE = torch.zeros(expert_TK.shape[0], num_experts + 1, dtype=torch.bool, device=expert_TK.device)
    used_TE.scatter_(1, torch.where(expert_TK < 0, num_experts, expert_TK).long(), True)
    return used_TE[:, :num_experts]


def usage_from_decision(decision: RoutingDecision, batch_shape: tuple[int, ...] | None = None) -> list[Tensor]:
    """One usage matrix [L, E] per sequence of a decision over a [B, L] batch (default: one sequence)."""
    T, E = decision.num_tokens, decision.num_experts
    used_TE = torch.zeros(T, E, dtype=torch.bool, device=decision.expert_index.device)
    used_TE[decision.token_index, decision.expert_index] = True
    if batch_shape is None or len(batch_shape) <= 1:
        return [used_TE]
    L = int(batch_shape[-1])
    if T % L:
        raise ValueError(f"batch_shape {tuple(batch_shape)} does not match the decision's {T} tokens")
    return list(used_TE.view(T // L, L, E).unbind(0))


def _sequences(used: Tensor | Sequence[Tensor]) -> list[Tensor]:
    seqs = [used] if isinstance(used, Tensor) else list(used)
    if not seqs:
        raise ValueError("no sequences given (a usage matrix [T, E] or a list of them)")
    E = seqs[0].shape[-1] if seqs[0].dim() == 2 else None
    for s in seqs:
        if s.dim() != 2 or s.shape[-1] != E:
            raise ValueError(f"each sequence must be a usage matrix [T, E={E}], got shape {tuple(s.shape)}")
    return [s.to(torch.bool) for s in seqs]


def _check_m(m: int) -> None:
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise ValueError(f"m (segment length) must be an integer >= 1, got {m!r}")


def srp(used: Tensor | Sequence[Tensor], m: int, *, stride: int | None = None) -> float:
    """SRP(m) over one usage matrix [T, E] or a list of them (one per sequence); nan when nothing was routed."""
    _check_m(m)
    stride = m if stride is None else stride
    if not isinstance(stride, int) or isinstance(stride, bool) or not 1 <= stride <= m:
        raise ValueError(f"stride must be an integer in [1, m={m}], got {stride!r}")
    matches_J = torch.zeros(m, dtype=torch.float64)
    preds_J = torch.zeros(m, dtype=torch.float64)
    acts = 0.0
    j_J = torch.arange(1, m + 1)
    for used_TE in _sequences(used):
        T = used_TE.shape[0]
        if T == 0:
            continue
        prefix_TE = torch.cat([used_TE.new_zeros(1, used_TE.shape[1], dtype=torch.long), used_TE.long().cumsum(0)])
        if stride == m:
            starts_W = torch.arange(0, T, m)
        else:
            starts_W = torch.arange(0, max(T - m, 0) + 1, stride)
        ends_W = (starts_W + m).clamp_max(T)
        count_WE = prefix_TE[ends_W] - prefix_TE[starts_W]
        len_W = (ends_W - starts_W).double()
        picked_JWE = count_WE[None] >= j_J[:, None, None]
        matches_J += (count_WE[None] * picked_JWE).sum((1, 2)).double()
        preds_J += (picked_JWE.sum(-1).double() * len_W).sum(-1)
        acts += float(count_WE.sum())
    if acts == 0:
        return float("nan")
    return float((2 * matches_J / (preds_J + acts)).max())


def sch(used: Tensor | Sequence[Tensor], m: int, cache_size: int) -> float:
    """SCH(m, c) over one usage matrix [T, E] or a list of them (one per sequence); nan when nothing was routed."""
    _check_m(m)
    if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 1:
        raise ValueError(f"cache_size must be an integer >= 1, got {cache_size!r}")
    hits, acts = 0, 0
    for used_TE in _sequences(used):
        T, E = used_TE.shape
        if T == 0:
            continue
        prefix_TE = torch.cat([used_TE.new_zeros(1, E, dtype=torch.long), used_TE.long().cumsum(0)])
        t_T = torch.arange(T)
        future_TE = prefix_TE[(t_T + m).clamp_max(T)] - prefix_TE[t_T]
        # last use at or before t, then shifted by one token: the last use strictly before t (-1: never used).
        last_TE = torch.where(used_TE, t_T[:, None], -1).cummax(0).values
        last_before_TE = torch.cat([torch.full((1, E), -1, dtype=torch.long), last_TE[:-1]])
        seen_TE = last_before_TE >= 0
        key_TE = torch.where(seen_TE, future_TE * (T + 1) + last_before_TE, -1)
        order_TE = torch.sort(key_TE, dim=1, descending=True, stable=True).indices  # ties: lower expert id first
        rank_TE = torch.empty_like(order_TE).scatter_(1, order_TE, torch.arange(E).expand(T, E))
        cached_TE = seen_TE & (rank_TE < cache_size)
        hits += int((cached_TE & used_TE).sum())
        acts += int(used_TE.sum())
    return hits / acts if acts else float("nan")

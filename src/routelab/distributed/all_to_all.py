"""The all-to-all dispatcher of expert parallelism: rows travel to the rank that holds their expert and back.

Shape legend: T tokens, D model width, E experts (global), L = E/W experts held per rank, W ranks, J slots of a
rank (its L experts, then the experts it borrows under least-loaded balancing), S assignments of this rank,
R rows this rank computes.

    dispatch: sort this rank's assignments by expert; all-gather the per-expert counts [W, E] (so every rank knows
              every split, and the least-loaded planner sees global loads); send rows with one uneven all-to-all;
              reorder the received rows (source-major) into slot order: the rows and per-slot counts the experts
              see.
    combine:  the inverse reorder; the reverse all-to-all; the token's owner applies the combine weights (once).

Every rank enters the same collectives in the same order, whatever its tokens (zero tokens, all tokens on one
expert): counts are exchanged first, so splits always match, and `_collectives.touch` keeps the backward
collectives on every rank's graph.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from routelab._checks import check_bool, check_number
from routelab.dispatch.base import Dispatcher
from routelab.dispatch.permute import DispatchPlan, combine, make_plan
from routelab.distributed._collectives import all_gather_rows, all_to_all, touch
from routelab.distributed.least_loaded import Move, plan_least_loaded
from routelab.routing.base import RoutingDecision


@dataclass(frozen=True)
class AllToAllPlan:
    """What `combine` needs to bring the expert outputs home (frozen; the dispatcher keeps nothing).

    local:        this rank's assignments sorted by expert (tokens and combine weights, applied at home).
    send_order_S: permutation from expert-sorted rows to send order (by destination rank, then slot); None = same.
    send_splits:  rows sent to each rank; recv_splits: rows received from each rank.
    recv_order_R: permutation from received (source-major) rows to slot order.
    counts_J:     rows per slot here (own experts, then borrowed ones).
    borrowed:     global ids of the experts this rank computes with lent weights (slots L, L+1, ...).
    moves:        the least-loaded moves of this forward (the same on every rank).
    global_counts_WE: LongTensor [W, E], assignments of every rank to every expert (for statistics).
    received_RD:  the rows as they arrived (kept only so that `combine` can join them to the output's graph).
    """

    local: DispatchPlan
    send_order_S: Tensor | None
    send_splits: list[int]
    recv_splits: list[int]
    recv_order_R: Tensor
    counts_J: Tensor
    borrowed: tuple[int, ...]
    moves: tuple[Move, ...]
    global_counts_WE: Tensor
    received_RD: Tensor | None = None


class AllToAllDispatcher(Dispatcher):
    """Expert-parallel dispatch over a process group: rank r holds experts [r·L, (r+1)·L), L = E/W.

    num_experts:  E (global; divisible by the group's size).
    group:        a torch.distributed process group (None: the default group).
    least_loaded: move overflow rows of hot experts, with a copy of their weights, to the least-loaded ranks when
                  a rank's load exceeds alpha × mean (`least_loaded.py`); same outputs and gradients.
    alpha:        the least-loaded threshold, ≥ 1 (default 1.3).

    Nothing is kept between dispatch and combine: a forward's plan travels from one to the other explicitly.
    """

    def __init__(self, num_experts: int, *, group=None, least_loaded: bool = False, alpha: float = 1.3) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call torch.distributed.init_process_group (torchrun does it) "
                "before building an all-to-all dispatcher"
            )
        check_bool("least_loaded", least_loaded)
        check_number("alpha", alpha, low=1)
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.world_size:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the group size {self.world_size}: expert parallelism "
                "gives every rank the same number of experts"
            )
        self.num_experts, self.per_rank = num_experts, num_experts // self.world_size
        self.least_loaded, self.alpha = least_loaded, float(alpha)

    # -- dispatch / combine ---------------------------------------------------------------------------------------

    def dispatch(self, x_TD: Tensor, decision: RoutingDecision) -> tuple[Tensor, Tensor, AllToAllPlan]:
        plan = self.make_plan(decision)
        rows_SD = x_TD.index_select(0, plan.local.token_S)
        if plan.send_order_S is not None:
            rows_SD = rows_SD.index_select(0, plan.send_order_S)
        recv_RD = all_to_all(rows_SD, plan.send_splits, plan.recv_splits, self.group)
        plan = dataclasses.replace(plan, received_RD=recv_RD)
        return recv_RD.index_select(0, plan.recv_order_R), plan.counts_J, plan

    def combine(self, out_RD: Tensor, plan: AllToAllPlan) -> Tensor:
        back_RD = out_RD.index_select(0, _inverse(plan.recv_order_R))
        home_SD = all_to_all(back_RD, plan.recv_splits, plan.send_splits, self.group)
        if plan.send_order_S is not None:
            home_SD = home_SD.index_select(0, _inverse(plan.send_order_S))
        return touch(combine(home_SD, plan.local), home_SD, plan.received_RD)

    # -- least-loaded: the dispatcher runs the bank, with borrowed experts appended ---------------------------------

    def can_fuse(self, experts: nn.Module) -> bool:
        return self.least_loaded

    def fused(self, x_TD: Tensor, decision: RoutingDecision, experts: nn.Module) -> Tensor:
        """dispatch → own and borrowed experts → combine. Borrowed experts run with weights lent by their owners
        through one more all-to-all, whose backward returns their gradients to the owner."""
        rows_RD, counts_J, plan = self.dispatch(x_TD, decision)
        if not plan.moves:
            return self.combine(experts(rows_RD, counts_J), plan)
        params = dict(experts.named_parameters())
        lent = self._lend(params, plan)
        extended = {name: torch.cat([p, lent[name]]) for name, p in params.items()}
        out_RD = functional_call(experts, extended, (rows_RD, counts_J))
        return touch(self.combine(out_RD, plan), *lent.values())

    def _lend(self, params: dict[str, Tensor], plan: AllToAllPlan) -> dict[str, Tensor]:
        """{name: [len(plan.borrowed), ...]}: the weights of the experts this rank borrows, from their owners."""
        L, W = self.per_rank, self.world_size
        borrowers = _borrowers(plan.moves, W)
        sizes = [p[0].numel() for p in params.values()]
        pieces, send = [], []
        for h in range(W):
            mine = [e - self.rank * L for e in borrowers[h] if e // L == self.rank]
            send.append(len(mine) * sum(sizes))
            pieces += [torch.cat([p[i].reshape(-1) for p in params.values()]) for i in mine]
        recv = [sum(sizes) * sum(1 for e in borrowers[self.rank] if e // L == o) for o in range(W)]
        anyp = next(iter(params.values()))
        flat = torch.cat(pieces) if pieces else anyp.new_zeros(0)
        got = all_to_all(flat, send, recv, self.group).view(len(plan.borrowed), sum(sizes))
        return {
            name: part.reshape(len(plan.borrowed), *p.shape[1:])
            for (name, p), part in zip(params.items(), got.split(sizes, dim=1))
        }

    # -- the plan ---------------------------------------------------------------------------------------------------

    def make_plan(self, decision: RoutingDecision) -> AllToAllPlan:
        """Sort, exchange counts, and work out every split (identically on every rank)."""
        if decision.num_experts != self.num_experts:
            raise ValueError(f"decision.num_experts={decision.num_experts} but the dispatcher has {self.num_experts}")
        W, L, E, me = self.world_size, self.per_rank, self.num_experts, self.rank
        local = make_plan(decision)
        C_WE = all_gather_rows(local.group_sizes_E, self.group).cpu()  # the only collective before the rows move
        moves = tuple(plan_least_loaded(C_WE.sum(0).tolist(), W, alpha=self.alpha)) if self.least_loaded else ()
        borrowers = _borrowers(moves, W)
        J = L + max(len(b) for b in borrowers)
        # N[s, d, j]: rows that rank s sends to rank d for its slot j.
        N_WWJ = torch.zeros(W, W, J, dtype=torch.long)
        owner_E = torch.arange(E) // L
        N_WWJ[:, owner_E, torch.arange(E) % L] = C_WE
        pieces_mine: dict[int, list[tuple[int, int, int]]] = {}
        for e, segments in _segments(moves, C_WE.sum(0), L, borrowers).items():
            o = e // L
            N_WWJ[:, o, e % L] = 0
            start = 0
            for s in range(W):
                n_s = int(C_WE[s, e])
                lo, hi = start, start + n_s
                for d, j, a, b in segments:
                    n = max(0, min(hi, b) - max(lo, a))
                    if n:
                        N_WWJ[s, d, j] += n
                        if s == me:
                            pieces_mine.setdefault(e, []).append((d, j, n))
                start = hi
        send_order = None
        if moves:
            dest, slot, count = [], [], []
            for e, n_e in enumerate(C_WE[me].tolist()):
                for d, j, n in pieces_mine.get(e, [(e // L, e % L, n_e)] if n_e else []):
                    dest.append(d), slot.append(j), count.append(n)
            count_t = torch.tensor(count, dtype=torch.long)
            key_S = torch.repeat_interleave(torch.tensor(dest, dtype=torch.long) * J + torch.tensor(slot), count_t)
            send_order = torch.sort(key_S, stable=True).indices
        recv_WJ = N_WWJ[:, me]
        slot_R = torch.repeat_interleave(torch.arange(J).repeat(W), recv_WJ.reshape(-1))
        device = local.token_S.device
        return AllToAllPlan(
            local=local,
            send_order_S=None if send_order is None else send_order.to(device),
            send_splits=N_WWJ[me].sum(1).tolist(),
            recv_splits=recv_WJ.sum(1).tolist(),
            recv_order_R=torch.sort(slot_R, stable=True).indices.to(device),
            counts_J=recv_WJ.sum(0),
            borrowed=tuple(borrowers[me]),
            moves=moves,
            global_counts_WE=C_WE,
        )

    def __repr__(self) -> str:
        return (
            f"AllToAllDispatcher(num_experts={self.num_experts}, world_size={self.world_size}, rank={self.rank}, "
            f"least_loaded={self.least_loaded}, alpha={self.alpha})"
        )


def _borrowers(moves: tuple[Move, ...], world_size: int) -> list[list[int]]:
    """For each rank, the sorted global ids of the experts it borrows."""
    out: list[set[int]] = [set() for _ in range(world_size)]
    for m in moves:
        out[m.to_rank].add(m.expert)
    return [sorted(s) for s in out]


def _segments(moves, load_E: Tensor, L: int, borrowers: list[list[int]]) -> dict[int, list[tuple[int, int, int, int]]]:
    """For each moved expert: (rank, slot, start, end) over the global order of its rows — the owner keeps the
    first rows, the helpers take the rest in the order of the moves."""
    by_expert: dict[int, list[Move]] = {}
    for m in moves:
        by_expert.setdefault(m.expert, []).append(m)
    out = {}
    for e, ms in by_expert.items():
        kept = int(load_E[e]) - sum(m.count for m in ms)
        segments, start = [(e // L, e % L, 0, kept)], kept
        for m in ms:
            j = L + borrowers[m.to_rank].index(e)
            segments.append((m.to_rank, j, start, start + m.count))
            start += m.count
        out[e] = segments
    return out


def _inverse(order: Tensor) -> Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse

"""Least-Loaded Expert Parallelism: the planner. Loads in, moves out; a pure function of integers.

Paper: Least-Loaded Expert Parallelism (LLEP). Under expert parallelism rank r computes the experts it holds, so a
few hot experts make one rank the straggler of every step. LLEP moves the overflow assignments of hot experts,
together with a copy of those experts' weights, to the least-loaded ranks; every assignment is still computed once,
by the same weights, so the result is exactly the standard MoE while the maximum rank load drops.

Defining property (tested): the moves conserve every expert's assignments; when max rank load ≤ α·mean nothing
moves; otherwise every rank ends at most at the cap C = max(⌊α·mean⌋, ⌈mean⌉) — that is, ≤ α·mean whenever
⌊α·mean⌋ ≥ ⌈mean⌉ (an integer assignment of rows can reach it), and ⌈mean⌉ (the best possible) otherwise.

Algorithm (our reconstruction of the paper's greedy): ranks over the cap, most loaded first, shed their excess
from their hottest experts first; each piece goes to the currently least-loaded rank (ties: lower rank), at most
as much as fills it to the cap. The owner keeps the first rows of an expert (in the global order of the rows), the
helpers take the rest in the order of the moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from routelab._checks import check_int, check_number


@dataclass(frozen=True)
class Move:
    """`count` assignments of `expert` computed on rank `to_rank` (with a copy of its weights), not its owner."""

    expert: int
    to_rank: int
    count: int


def rank_loads(load_E: list[int], world_size: int) -> list[int]:
    """Assignments per rank when rank r holds experts [r·E/W, (r+1)·E/W)."""
    per_rank = len(load_E) // world_size
    return [sum(load_E[r * per_rank : (r + 1) * per_rank]) for r in range(world_size)]


def plan_least_loaded(load_E: list[int], world_size: int, *, alpha: float = 1.3) -> list[Move]:
    """The moves that bring every rank to at most the cap (see the module docstring); [] when balanced enough.

    load_E: assignments per expert over the whole group (E divisible by world_size); alpha ≥ 1.
    """
    check_int("world_size", world_size, 1)
    check_number("alpha", alpha, low=1)
    E = len(load_E)
    if E == 0 or E % world_size:
        raise ValueError(f"len(load_E) must be a positive multiple of world_size={world_size}, got {E}")
    if any(not isinstance(n, int) or n < 0 for n in load_E):
        raise ValueError("load_E must hold integers >= 0")
    loads = rank_loads(load_E, world_size)
    total = sum(loads)
    mean = total / world_size
    if total == 0 or max(loads) <= alpha * mean:
        return []
    cap = max(math.floor(alpha * mean), math.ceil(mean))
    per_rank = E // world_size
    moved: dict[tuple[int, int], int] = {}
    for r in sorted(range(world_size), key=lambda r: (-loads[r], r)):
        if loads[r] <= cap:
            continue
        hot = sorted(range(r * per_rank, (r + 1) * per_rank), key=lambda e: (-load_E[e], e))
        for e in hot:
            left_e = load_E[e]
            while loads[r] > cap and left_e > 0:
                h = min(range(world_size), key=lambda q: (loads[q], q))
                n = min(loads[r] - cap, left_e, cap - loads[h])
                # NOTE: n > 0 always: if every other rank were at the cap, the total would exceed W·cap ≥ total.
                moved[(e, h)] = moved.get((e, h), 0) + n
                loads[r] -= n
                loads[h] += n
                left_e -= n
            if loads[r] <= cap:
                break
    return [Move(e, h, n) for (e, h), n in moved.items()]

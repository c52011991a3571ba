"""The least-loaded planner (distributed/least_loaded.py) as properties: exactness of the result, every rank at most
α·mean when an integer assignment can reach it, no move when balanced, moves only from a hot expert's owner."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routelab.distributed import plan_least_loaded
from routelab.distributed.least_loaded import rank_loads


@st.composite
def loads(draw):
    W = draw(st.integers(1, 6))
    L = draw(st.integers(1, 5))
    skew = draw(st.sampled_from(["uniform", "zipf", "one_hot"]))
    if skew == "uniform":
        load = draw(st.lists(st.integers(0, 50), min_size=W * L, max_size=W * L))
    elif skew == "zipf":
        scale = draw(st.integers(1, 500))
        load = [scale // (i + 1) for i in range(W * L)]
        load = [load[i] for i in draw(st.permutations(range(W * L)))]
    else:
        load = [0] * (W * L)
        load[draw(st.integers(0, W * L - 1))] = draw(st.integers(1, 300))
    alpha = draw(st.sampled_from([1.0, 1.1, 1.3, 2.0]))
    return load, W, alpha


def _apply(load, W, moves):
    L = len(load) // W
    final = rank_loads(load, W)
    for m in moves:
        final[m.expert // L] -= m.count
        final[m.to_rank] += m.count
    return final


@settings(max_examples=150, deadline=None)
@given(loads())
def test_moves_are_exact_and_bring_every_rank_under_the_cap(case):
    load, W, alpha = case
    L = len(load) // W
    moves = plan_least_loaded(load, W, alpha=alpha)
    # Exactness: each expert's assignments are all computed once (no expert gives away more than it has), moves go
    # from the owner to another rank, and the total is conserved.
    for e in range(len(load)):
        assert sum(m.count for m in moves if m.expert == e) <= load[e]
    assert all(m.count > 0 and m.to_rank != m.expert // L for m in moves)
    final = _apply(load, W, moves)
    assert sum(final) == sum(load)
    mean = sum(load) / W
    before = rank_loads(load, W)
    if max(before) <= alpha * mean:
        assert moves == []  # balanced enough: nothing moves
    elif math.floor(alpha * mean) >= math.ceil(mean):  # an integer assignment can reach α·mean
        assert max(final) <= alpha * mean
    else:
        assert max(final) <= math.ceil(mean)
    assert max(final) <= max(before)


def test_a_hand_example():
    # 2 ranks, experts 0,1 on rank 0 and 2,3 on rank 1; rank 0 carries 12 of 14: mean 7, cap ⌊1.3·7⌋ = 9.
    moves = plan_least_loaded([10, 2, 1, 1], 2, alpha=1.3)
    assert [(m.expert, m.to_rank, m.count) for m in moves] == [(0, 1, 3)]
    assert _apply([10, 2, 1, 1], 2, moves) == [9, 5]


@pytest.mark.parametrize("kwargs,match", [(dict(alpha=0.9), "alpha"), (dict(alpha=float("nan")), "alpha")])
def test_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_least_loaded([1, 2], 2, **kwargs)
    with pytest.raises(ValueError, match="multiple of world_size"):
        plan_least_loaded([1, 2, 3], 2)

"""SRP and SCH (routelab.inference.consistency) against hand computations and a plain per-token reference loop."""

from __future__ import annotations

import random

import pytest
import torch

from routelab.inference.consistency import sch, srp, usage_from_decision, usage_from_indices
from routelab.routing.base import RoutingDecision


def _usage(sets: list[set[int]], E: int) -> torch.Tensor:
    used = torch.zeros(len(sets), E, dtype=torch.bool)
    for t, s in enumerate(sets):
        used[t, list(s)] = True
    return used


TRACE = [{0, 1}, {0, 2}, {1, 2}, {1, 2}]  # 4 tokens, 3 experts, k = 2


def test_srp_segments_by_hand():
    # Segments [t0,t1]: c = (2,1,1); [t2,t3]: c = (0,2,2); 8 activations.
    # j=1: matched 4+4, predicted 2·3 + 2·2 = 10 → 16/18;  j=2: matched 2+4, predicted 2·1 + 2·2 = 6 → 12/14.
    assert srp(_usage(TRACE, 3), 2) == pytest.approx(16 / 18)


def test_srp_sliding_windows_by_hand():
    # Windows [0,1], [1,2], [2,3]: c = (2,1,1), (1,1,2), (0,2,2); 12 activations.
    # j=1: matched 12, predicted 6+6+4 = 16 → 24/28;  j=2: matched 2+2+4, predicted 2+2+4 → 16/20.
    assert srp(_usage(TRACE, 3), 2, stride=1) == pytest.approx(24 / 28)


def test_srp_is_one_at_m1_and_for_segment_constant_routing():
    g = torch.Generator().manual_seed(0)
    random_used = torch.rand(37, 8, generator=g) < 0.3
    random_used[:, 0] = True
    assert srp(random_used, 1) == pytest.approx(1.0)
    constant = torch.zeros(32, 8, dtype=torch.bool)
    for seg in range(4):
        constant[seg * 8 : (seg + 1) * 8, [seg, (seg + 3) % 8]] = True
    assert srp(constant, 8) == pytest.approx(1.0)
    assert 0 <= srp(random_used, 4) <= 1


def test_windows_never_cross_sequences():
    a, b = _usage([{0}], 2), _usage([{1}], 2)
    assert srp([a, b], 2) == pytest.approx(1.0)  # each sequence is one 1-token segment
    # concatenated, the segment holds experts 0 and 1 once each: matched 2, predicted 2·2 → 4/6
    assert srp(torch.cat([a, b]), 2) == pytest.approx(4 / 6)


def test_sch_by_hand():
    trace = _usage([{0}, {1}, {0}, {1}, {0}], 3)
    # c=1, m=2: t0, t1 first uses; t2: counts in [2,4) tie 1-1, expert 1 more recent → cache {1}, miss;
    # t3: tie again, expert 0 more recent → cache {0}, miss; t4: cache {0} (count 1 vs 0), hit.
    assert sch(trace, 2, 1) == pytest.approx(1 / 5)
    assert sch(trace, 2, 2) == pytest.approx(3 / 5)  # everything seen is cached; only first uses miss
    assert sch(trace, 1, 1) == pytest.approx(3 / 5)  # m = 1: the next token's own expert is cached


def _sch_reference(sets: list[set[int]], m: int, c: int) -> float:
    """A plain loop over tokens, written independently of the vectorised version."""
    last: dict[int, int] = {}
    hits = acts = 0
    for t, s in enumerate(sets):
        future = {e: sum(e in sets[u] for u in range(t, min(t + m, len(sets)))) for e in last}
        ranked = sorted(last, key=lambda e: (-future[e], -last[e], e))
        cache = set(ranked[:c])
        hits += len(s & cache)
        acts += len(s)
        for e in s:
            last[e] = t
    return hits / acts


def _srp_reference(sets: list[set[int]], m: int) -> float:
    best = 0.0
    acts = sum(len(s) for s in sets)
    for j in range(1, m + 1):
        matched = predicted = 0
        for start in range(0, len(sets), m):
            seg = sets[start : start + m]
            counts = {e: sum(e in s for s in seg) for e in set().union(*seg)}
            picked = [e for e, n in counts.items() if n >= j]
            matched += sum(counts[e] for e in picked)
            predicted += len(seg) * len(picked)
        best = max(best, 2 * matched / (predicted + acts))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_against_reference_loops(seed):
    rng = random.Random(seed)
    E = 6
    sets = [set(rng.sample(range(E), rng.choice([1, 2, 2, 3]))) for _ in range(rng.randint(20, 45))]
    used = _usage(sets, E)
    for m in (1, 3, 4, 16):
        assert srp(used, m) == pytest.approx(_srp_reference(sets, m))
        previous = 0.0
        for c in range(1, E + 1):
            value = sch(used, m, c)
            assert value == pytest.approx(_sch_reference(sets, m, c))
            assert value >= previous - 1e-12  # non-decreasing in the cache size
            previous = value


def test_usage_builders():
    expert_TK = torch.tensor([[0, 2], [1, -1]])
    assert usage_from_indices(expert_TK, 3).tolist() == [[True, False, True], [False, True, False]]
    decision = RoutingDecision(
        token_index=torch.tensor([0, 1, 2, 3]), expert_index=torch.tensor([0, 1, 1, 2]),
        weight=torch.ones(4), num_tokens=4, num_experts=3,
    )  # fmt: skip
    seqs = usage_from_decision(decision, (2, 2))
    assert [s.tolist() for s in seqs] == [[[True, False, False], [False, True, False]],
                                          [[False, True, False], [False, False, True]]]


def test_bad_input():
    used = _usage(TRACE, 3)
    with pytest.raises(ValueError, match="m \\(segment length\\)"):
        srp(used, 0)
    with pytest.raises(ValueError, match="stride"):
        srp(used, 2, stride=3)
    with pytest.raises(ValueError, match="cache_size"):
        sch(used, 2, 0)
    with pytest.raises(ValueError, match="usage matrix"):
        srp([used, torch.zeros(2, 4, dtype=torch.bool)], 2)
    with pytest.raises(ValueError, match="outside"):
        usage_from_indices(torch.tensor([[5]]), 3)
    assert srp(torch.zeros(4, 3, dtype=torch.bool), 2) != srp(torch.zeros(4, 3, dtype=torch.bool), 2)  # nan

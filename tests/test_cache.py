"""The expert cache simulator against plain reference caches, and Belady's bound over every other policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routelab.inference.cache import (
    ARCCache,
    CapacityError,
    LFUCache,
    LRUCache,
    demand,
    lru_ranks,
    plot_hit_rates,
    simulate_cache,
    sweep_cache,
)
from routelab.inference.trace import RoutingTrace, record_trace


def make_trace(experts_per_layer, num_experts, tokens_per_step=1, predicted=None):
    """A trace from lists of per-token expert id lists, one list per layer."""
    N = len(experts_per_layer[0])
    ex = []
    for rows in experts_per_layer:
        K = max((len(r) for r in rows), default=0)
        a = np.full((N, max(K, 1)), -1, dtype=np.int16)
        for i, r in enumerate(rows):
            a[i, : len(r)] = sorted(r)
        ex.append(a)
    off = np.arange(0, N + 1, tokens_per_step)
    if off[-1] != N:
        off = np.append(off, N)
    return RoutingTrace(
        token_ids=np.zeros(N, np.int32), sequence_ids=np.zeros(N, np.int32), positions=np.arange(N, dtype=np.int32),
        step_offsets=off.astype(np.int64), experts=ex, weights=[np.ones(a.shape, np.float32) for a in ex],
        num_experts=[num_experts] * len(ex), expert_bytes=[1000] * len(ex), predicted=predicted or [],
    )  # fmt: skip


def random_trace(seed, N=300, L=2, E=8, k=2, skew=0.4):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(E, skew))
    layers = [[list(rng.choice(E, k, replace=False, p=p)) for _ in range(N)] for _ in range(L)]
    return make_trace(layers, E)


# -- plain reference caches: a recency list and a count table, nothing shared with the simulator --------------------


def reference_lru(steps, capacity):
    order, misses = [], []  # least recent first
    for needed in steps:
        miss = []
        for e in sorted(needed):
            if e in order:
                order.remove(e)
            else:
                if len(order) >= capacity:
                    victim = next(x for x in order if x not in needed)
                    order.remove(victim)
                miss.append(e)
            order.append(e)
        misses.append(miss)
    return misses


def reference_lfu(steps, capacity):
    resident, count, last, misses, clock = [], {}, {}, [], 0
    for needed in steps:
        miss = []
        for e in sorted(needed):
            clock += 1
            if e not in resident:
                if len(resident) >= capacity:
                    candidates = [x for x in resident if x not in needed]
                    candidates.sort(key=lambda x: (count[x], last[x]))
                    resident.remove(candidates[0])
                resident.append(e)
                miss.append(e)
            count[e] = count.get(e, 0) + 1
            last[e] = clock
        misses.append(miss)
    return misses


def per_step_sets(trace, layer=0):
    d = demand(trace)
    return [set(np.flatnonzero(row).tolist()) for row in d.used[layer]]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), capacity=st.integers(2, 8), tokens=st.integers(1, 3))
def test_lru_and_lfu_equal_plain_references_step_by_step(seed, capacity, tokens):
    trace = random_trace(seed, N=120, L=1)
    trace = make_trace([[list(r[r >= 0]) for r in trace.experts[0]]], 8, tokens_per_step=tokens)
    steps = per_step_sets(trace)
    if max(len(s) for s in steps) > capacity:
        with pytest.raises(CapacityError, match="capacity"):
            simulate_cache(trace, capacity, "lru")
        return
    for cls, ref in ((LRUCache, reference_lru), (LFUCache, reference_lfu)):
        cache, want = cls(capacity), ref(steps, capacity)
        for t, needed in enumerate(steps):
            assert cache.access(sorted(needed), t) == want[t], (cls.__name__, t)
    # the vectorised LRU: access by access, and the totals of both engines
    (rank_A,), (step_A,) = lru_ranks(demand(trace))
    missed = {(t, e) for t, miss in enumerate(reference_lru(steps, capacity)) for e in miss}
    e_A = np.concatenate([sorted(s) for s in steps])
    assert {(int(t), int(e)) for t, e, r in zip(step_A, e_A, rank_A) if r >= capacity} == missed
    vec, loop = simulate_cache(trace, capacity, "lru"), simulate_cache(trace, capacity, "lru", engine="loop")
    assert vec.misses == loop.misses == len(missed)
    assert simulate_cache(trace, capacity, "lfu").misses == sum(map(len, reference_lfu(steps, capacity)))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), capacity=st.integers(2, 8), scope=st.sampled_from(["layer", "global"]))
def test_belady_bounds_every_policy_on_random_traces(seed, capacity, scope):
    trace = random_trace(seed, N=150, L=2, skew=float(np.random.default_rng(seed).uniform(0.1, 3)))
    capacity = capacity * (2 if scope == "global" else 1)
    best = simulate_cache(trace, capacity, "belady", scope=scope)
    for policy in ("lru", "lfu", "arc"):
        other = simulate_cache(trace, capacity, policy, scope=scope)
        assert best.hit_rate >= other.hit_rate, policy
        assert best.requests == other.requests
    vec = simulate_cache(trace, capacity, "lru", scope=scope)
    assert vec.misses == simulate_cache(trace, capacity, "lru", scope=scope, engine="loop").misses


def test_belady_bounds_every_policy_on_a_real_model_trace(shared_data):
    from routelab.models.transformer import ModelConfig, MoETransformerLM

    text = (shared_data / "tinyshakespeare.txt").read_bytes()[:1600]
    ids = torch.tensor(list(text), dtype=torch.long) % 256
    torch.manual_seed(0)
    model = MoETransformerLM(ModelConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=4, d_ff=24, num_experts=8,
                                         max_seq_len=128))
    # route-heavy init so that routing follows the text, not uniform noise
    for moe in model.moe_layers:
        torch.nn.init.normal_(moe.router.gate.weight, std=2.0)
    trace = record_trace(model, list(ids.split(100)), predict=True).per_token()
    for capacity in (2, 4, 6):
        best = simulate_cache(trace, capacity, "belady")
        results = [simulate_cache(trace, capacity, p) for p in ("lru", "lfu", "arc", "pregated")]
        for r in results[:3]:
            assert best.hit_rate >= r.hit_rate, (capacity, r.policy)
        # prefetching may raise the hit rate above MIN's, never lower the loads below MIN's
        assert best.loads <= results[3].loads
        assert results[3].prediction_recall is not None and 0 < results[3].prediction_recall < 1


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), capacity=st.integers(2, 6))
def test_arc_invariants(seed, capacity):
    steps = per_step_sets(random_trace(seed, N=200, L=1, k=2))
    cache = ARCCache(capacity)
    for t, needed in enumerate(steps):
        cache.access(sorted(needed), t)
        assert set(cache.t1) | set(cache.t2) == cache.resident and not set(cache.t1) & set(cache.t2)
        assert len(cache.resident) <= capacity and 0 <= cache.p <= capacity
        assert len(cache.t1) + len(cache.b1) <= capacity
        assert len(cache.t1) + len(cache.t2) + len(cache.b1) + len(cache.b2) <= 2 * capacity
        assert needed <= cache.resident


def test_arc_keeps_a_frequent_expert_through_a_scan():
    # rounds of: hot experts 0 and 1 twice each, then a scan of 3 experts used once. With 3 slots LRU loses both hot
    # experts to every scan; ARC holds them in its frequency list T2 and lets the scan churn through T1.
    steps, fresh = [], iter(range(2, 64))
    for _ in range(8):
        steps += [[0], [1], [0], [1]] + [[next(fresh)] for _ in range(3)]
    trace = make_trace([steps], 64)
    lru, arc = simulate_cache(trace, 3, "lru"), simulate_cache(trace, 3, "arc")
    assert lru.hits == 2 * 8  # only the second use of 0 and 1 in each round
    assert arc.hits == lru.hits + 2 * 7  # after the first round, the hot experts survive every scan


def test_exact_prefetch_hides_loads_and_stall():
    # layer 1 predicted perfectly: every layer-1 access is a prefetch hit; only what compute cannot hide stalls
    rng = np.random.default_rng(0)
    layers = [[list(rng.choice(8, 2, replace=False)) for _ in range(200)] for _ in range(2)]
    exact = make_trace(layers, 8)
    pred = [None, exact.experts[1].copy()]
    trace = make_trace(layers, 8, predicted=pred)
    lru = simulate_cache(trace, 3, "lru", compute_s=1.0)
    pre = simulate_cache(trace, 3, "pregated", compute_s=1.0)
    assert pre.prediction_recall == 1.0 and pre.prediction_precision == 1.0
    lru_layer1_misses = simulate_cache(make_trace([layers[1]], 8), 3, "lru").misses
    assert pre.misses == lru.misses - lru_layer1_misses
    assert pre.stall_s == pytest.approx(pre.misses * 1000 / 16e9)
    assert lru.stall_s == pytest.approx(lru.misses * 1000 / 16e9)
    slow = simulate_cache(trace, 3, "pregated", compute_s=0.0, bandwidth=1000.0)
    assert slow.stall_s == pytest.approx(slow.loads)  # nothing overlaps: every load stalls 1 s


def test_metrics_by_hand():
    # 2 steps of one token, one layer: {0,1} then {1,2}; capacity 2
    trace = make_trace([[[0, 1], [1, 2]]], 4)
    r = simulate_cache(trace, 2, "lru")
    assert (r.requests, r.hits, r.misses, r.bytes_moved) == (4, 1, 3, 3000)
    assert r.hit_rate == 0.25 and r.loads_per_token == 1.5 and r.bytes_per_token == 1500


def test_bad_options_name_the_parameter(tmp_path):
    trace = make_trace([[[0, 1, 2], [1]]], 4)
    with pytest.raises(CapacityError, match="capacity=2 is below the 3 experts that step 0 of MoE layer 0"):
        simulate_cache(trace, 2)
    with pytest.raises(ValueError, match="policy must be one of"):
        simulate_cache(trace, 3, "fifo")
    with pytest.raises(ValueError, match="scope must be one of"):
        simulate_cache(trace, 3, scope="pool")
    with pytest.raises(ValueError, match="needs predictions"):
        simulate_cache(trace, 3, "pregated")
    with pytest.raises(ValueError, match="capacity must be an integer"):
        simulate_cache(trace, 0)


def test_sweep_and_plot(tmp_path):
    trace = random_trace(3, N=200, L=2)
    results = sweep_cache(trace, [2, 4, 8], ["lru", "lfu", "arc", "belady"])
    assert len(results) == 12
    path = plot_hit_rates(results, tmp_path / "hits.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    full = [r for r in results if r.capacity == 8]
    assert len({r.misses for r in full}) == 1  # capacity = E: only first uses miss, whatever the policy


def test_local_consistency_splits_the_trace_by_sequence():
    from routelab.inference.cache import local_consistency
    from routelab.inference.consistency import sch, srp

    # two interleaved sequences (as a batched decode records them): 0 uses experts {0, 1}, 1 uses {2, 3}
    rows = [[0, 1], [2, 3]] * 6
    trace = make_trace([rows], 4)
    trace = RoutingTrace(**{**{f: getattr(trace, f) for f in trace.__dataclass_fields__},
                            "sequence_ids": np.array([0, 1] * 6, dtype=np.int32)})
    (got,) = local_consistency(trace, [2], m=4)
    seq0 = torch.zeros(6, 4, dtype=torch.bool)
    seq0[:, :2] = True
    seq1 = torch.zeros(6, 4, dtype=torch.bool)
    seq1[:, 2:] = True
    assert got["srp"] == srp([seq0, seq1], 4) == 1.0  # constant routing within each sequence
    assert got["sch"][2] == sch([seq0, seq1], 4, 2) == 20 / 24  # only the 4 first uses miss

"""Expert-aware batching: never worse than FIFO on its objective, never drops or duplicates a request."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routelab.inference.batching import fifo_batches, request_experts, schedule_batches


def distinct_by_hand(used, batch):
    return sum(len({e for r in batch for e in np.flatnonzero(used[r, layer])}) for layer in range(used.shape[1]))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 100_000), R=st.integers(0, 40), B=st.integers(1, 9), clusters=st.integers(1, 5))
def test_never_worse_than_fifo_never_drops_or_duplicates(seed, R, B, clusters):
    rng = np.random.default_rng(seed)
    L, E = 2, 12
    centers = rng.random((clusters, L, E)) < 0.25
    used = centers[rng.integers(0, clusters, R)] | (rng.random((R, L, E)) < 0.05)
    plan = schedule_batches(used, B, lookahead=16)
    flat = [r for b in plan.batches for r in b]
    assert sorted(flat) == list(range(R))  # every request exactly once
    assert all(1 <= len(b) <= B for b in plan.batches)
    assert len(plan.batches) == len(fifo_batches(R, B))
    assert plan.objective <= plan.fifo_objective
    assert plan.distinct == [distinct_by_hand(used, b) for b in plan.batches]
    assert plan.fifo_distinct == [distinct_by_hand(used, b) for b in fifo_batches(R, B)]
    fifo_pos = {r: r // B for r in range(R)}
    pos = {r: i for i, b in enumerate(plan.batches) for r in b}
    assert plan.delays == [pos[r] - fifo_pos[r] for r in range(R)]


def test_interleaved_clusters_are_grouped():
    # requests alternate between two disjoint expert sets: FIFO batches mix them, the scheduler separates them
    a, b = np.zeros((1, 4), bool), np.zeros((1, 4), bool)
    a[0, :2], b[0, 2:] = True, True
    used = np.stack([a if r % 2 == 0 else b for r in range(8)])  # [8, 1, 4]
    plan = schedule_batches(used, 4, expert_bytes=[100])
    assert plan.batches == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert plan.distinct == [2, 2] and plan.fifo_distinct == [4, 4]
    assert plan.bytes_moved == 400 and plan.fifo_bytes_moved == 800
    assert plan.delays == [0, 1, 0, 1, -1, 0, -1, 0]  # 1, 3 wait one batch; 4, 6 are served one earlier
    assert plan.max_delay == 1 and plan.mean_delay == 0.0
    # with a cache holding all 4 experts, both plans load each expert once
    cached = schedule_batches(used, 4, expert_bytes=[100], capacity=4)
    assert cached.bytes_moved == 400 and cached.fifo_bytes_moved == 400
    fifo = schedule_batches(used, 4, method="fifo")
    assert fifo.batches == [[0, 1, 2, 3], [4, 5, 6, 7]] and fifo.method == "fifo"


def test_request_experts_from_a_model_and_bad_options():
    from routelab.models.transformer import ModelConfig, MoETransformerLM

    torch.manual_seed(0)
    model = MoETransformerLM(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=24, num_experts=8))
    prompts = [list(range(i, i + 10)) for i in range(6)]
    used = request_experts(model.eval(), prompts, prefix_tokens=4)
    assert used.shape == (6, 2, 8) and used.dtype == torch.bool
    with torch.no_grad():
        model(torch.tensor([prompts[3][:4]]))
    want = set(model.moe_layers[1].last_decision.expert_index.tolist())
    assert set(used[3, 1].nonzero().flatten().tolist()) == want
    plan = schedule_batches(used, 2)
    assert sorted(r for b in plan.batches for r in b) == list(range(6))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        schedule_batches(used, 0)
    with pytest.raises(ValueError, match="method must be one of"):
        schedule_batches(used, 2, method="random")
    with pytest.raises(ValueError, match="boolean array"):
        schedule_batches(np.zeros((3, 4)), 2)

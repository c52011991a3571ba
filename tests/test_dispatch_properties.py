"""Property tests of permute / combine: identity, group sizes, each assignment computed once, equivariance."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import routelab
from routelab.dispatch import combine, permute


@st.composite
def decisions(draw):
    T = draw(st.integers(0, 30))
    E = draw(st.integers(1, 9))
    pairs = []
    for t in range(T):
        chosen = draw(st.sets(st.integers(0, E - 1), max_size=E))
        pairs += [(t, e) for e in sorted(chosen)]
    order = draw(st.permutations(range(len(pairs))))  # assignments may arrive in any order
    pairs = [pairs[i] for i in order]
    token = torch.tensor([t for t, _ in pairs], dtype=torch.long)
    expert = torch.tensor([e for _, e in pairs], dtype=torch.long)
    count = torch.bincount(token, minlength=T).to(torch.float64)
    weight = 1.0 / count[token] if len(pairs) else torch.zeros(0, dtype=torch.float64)
    return routelab.RoutingDecision(token, expert, weight, num_tokens=T, num_experts=E)


@settings(max_examples=150, deadline=None)
@given(decisions(), st.integers(1, 6))
def test_permute_then_combine_with_unit_weights_is_identity(decision, D):
    x = torch.randn(decision.num_tokens, D, dtype=torch.float64, requires_grad=True)
    rows, sizes, plan = permute(x, decision)
    y = combine(rows, plan)
    covered = decision.experts_per_token() > 0
    torch.testing.assert_close(y[covered], x[covered], rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(y[~covered]) == 0
    upstream = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, upstream) if decision.num_assignments else (torch.zeros_like(x),)
    torch.testing.assert_close(grad[covered], upstream[covered], rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(grad[~covered]) == 0


@settings(max_examples=150, deadline=None)
@given(decisions())
def test_group_sizes_sum_to_S_and_rows_are_expert_contiguous(decision):
    x = torch.arange(decision.num_tokens, dtype=torch.float64)[:, None]
    rows, sizes, plan = permute(x, decision)
    assert int(sizes.sum()) == decision.num_assignments == rows.shape[0]
    assert torch.equal(sizes, decision.expert_load())
    experts_in_row_order = torch.repeat_interleave(torch.arange(decision.num_experts), sizes)
    # every (token, expert) assignment appears exactly once among the permuted rows
    got = sorted(zip(plan.token_S.tolist(), experts_in_row_order.tolist()))
    want = sorted(zip(decision.token_index.tolist(), decision.expert_index.tolist()))
    assert got == want
    assert torch.equal(rows[:, 0].long(), plan.token_S)


@settings(max_examples=100, deadline=None)
@given(decisions())
def test_each_assignment_is_computed_once(decision):
    """An expert bank where expert e scales rows by (e + 1): the layer output must equal the per-assignment sum."""
    T, E = decision.num_tokens, decision.num_experts
    x = torch.randn(T, 3, dtype=torch.float64)
    rows, sizes, plan = permute(x, decision)
    scale = torch.repeat_interleave(torch.arange(1, E + 1, dtype=torch.float64), sizes)
    y = combine(rows * scale[:, None], plan)
    expected = torch.zeros_like(x)
    for t, e, w in zip(decision.token_index.tolist(), decision.expert_index.tolist(), decision.weight.tolist()):
        expected[t] += w * (e + 1) * x[t]
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.sampled_from([(4, 1), (8, 2), (6, 3)]), st.randoms(use_true_random=False))
def test_dropless_layer_is_token_permutation_equivariant(T, shape, rnd):
    E, k = shape
    torch.manual_seed(rnd.randint(0, 10_000))
    layer = routelab.MoELayer(8, 12, routelab.create_router("topk", d_model=8, num_experts=E, k=k)).double()
    x = torch.randn(T, 8, dtype=torch.float64)
    perm = torch.randperm(T)
    torch.testing.assert_close(layer(x[perm]), layer(x)[perm], rtol=1e-12, atol=1e-12)

"""The fused gather → SwiGLU experts → weighted scatter-add (dispatch/routed_swiglu.py): gradcheck, and outputs and
every gradient against a per-assignment loop in fp64; the expert bank's fused and generic paths agree."""

import dataclasses
import multiprocessing
import os

import pytest
import torch

import routelab
from reference import swiglu_row
from routelab.dispatch import LocalDispatcher
from routelab.dispatch.permute import make_plan
from routelab.dispatch.routed_swiglu import routed_swiglu
from routelab.dispatch.workers import split_groups

DISPATCHER = LocalDispatcher()


def _routed(bank, x, decision):
    """dispatch → experts → combine through the local dispatcher: fused when the bank offers it, else generic."""
    if DISPATCHER.can_fuse(bank):
        return DISPATCHER.fused(x, decision, bank)
    rows, counts, plan = DISPATCHER.dispatch(x, decision)
    return DISPATCHER.combine(bank(rows, counts), plan)


def _random_decision(T, E, k, seed, dtype=torch.float64):
    """k distinct experts per token (fewer when E < k), in shuffled order, with random weights."""
    g = torch.Generator().manual_seed(seed)
    k = min(k, E)
    expert_TK = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]
    token_S = torch.arange(T).repeat_interleave(k)
    order = torch.randperm(T * k, generator=g)
    weight_S = torch.rand(T * k, generator=g, dtype=dtype)
    return routelab.RoutingDecision(
        token_index=token_S[order], expert_index=expert_TK.reshape(-1)[order], weight=weight_S,
        num_tokens=T, num_experts=E,
    )


def _bank(E, D, F, seed, dtype=torch.float64):
    torch.manual_seed(seed)
    return routelab.SwiGLUExperts(E, D, F).to(dtype)


def _reference(x_TD, decision, w_gate_up, w_down):
    rows = [x_TD.new_zeros(x_TD.shape[1]) for _ in range(x_TD.shape[0])]
    for t, e, w in zip(decision.token_index.tolist(), decision.expert_index.tolist(), decision.weight.unbind(0)):
        rows[t] = rows[t] + w * swiglu_row(x_TD[t], w_gate_up[e], w_down[e])
    return torch.stack(rows) if rows else x_TD.new_zeros(0, x_TD.shape[1])


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("T,E,k", [(1, 1, 1), (5, 3, 2), (6, 8, 3), (2, 8, 1)])
def test_gradcheck(T, E, k, workers):
    D, F = 5, 3
    decision = _random_decision(T, E, k, seed=T + E + k)
    plan = make_plan(decision)
    bank = _bank(E, D, F, seed=k)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    sizes = plan.group_sizes_E.tolist()

    def fn(x, weight, w_gate_up, w_down):
        return routed_swiglu(x, plan.token_S, weight, sizes, w_gate_up, w_down, workers=workers)

    inputs = (x, _leaf(plan.weight_S), _leaf(bank.w_gate_up), _leaf(bank.w_down))
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("T,E,k", [(1, 8, 1), (9, 1, 1), (33, 8, 2), (64, 16, 4), (40, 64, 8), (7, 4, 3)])
def test_matches_per_assignment_loop_fp64(T, E, k, workers):
    D, F = 13, 11  # odd widths on purpose
    decision = _random_decision(T, E, k, seed=T * 100 + E)
    plan = make_plan(decision)
    bank = _bank(E, D, F, seed=E)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    weight = _leaf(plan.weight_S)
    w_gate_up, w_down = _leaf(bank.w_gate_up), _leaf(bank.w_down)
    y = routed_swiglu(x, plan.token_S, weight, plan.group_sizes_E.tolist(), w_gate_up, w_down, workers=workers)

    x_ref, wgu_ref, wd_ref = _leaf(x), _leaf(bank.w_gate_up), _leaf(bank.w_down)
    weight_ref = _leaf(decision.weight)
    ref_decision = routelab.RoutingDecision(
        decision.token_index, decision.expert_index, weight_ref, num_tokens=T, num_experts=E
    )
    y_ref = _reference(x_ref, ref_decision, wgu_ref, wd_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)

    upstream = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(y, [x, weight, w_gate_up, w_down], upstream)
    ref_grads = list(torch.autograd.grad(y_ref, [x_ref, weight_ref, wgu_ref, wd_ref], upstream, allow_unused=True))
    # An expert bank the reference loop never touched gets no gradient there; ours is zeros.
    ref_grads = [torch.zeros_like(g) if r is None else r for g, r in zip(grads, ref_grads)]
    # The plan holds the weights in expert-sorted order: put the reference's in that order.
    ref_grads[1] = ref_grads[1][torch.sort(decision.expert_index, stable=True).indices]
    for name, g, g_ref in zip(["x", "weight", "w_gate_up", "w_down"], grads, ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_zero_tokens():
    bank = _bank(4, 6, 5, seed=0)
    decision = _random_decision(0, 4, 2, seed=0)
    x = torch.randn(0, 6, dtype=torch.float64, requires_grad=True)
    y = _routed(bank, x, decision)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.count_nonzero(bank.w_gate_up.grad) == 0 and torch.count_nonzero(bank.w_down.grad) == 0


def test_experts_without_rows_get_zero_gradients_not_none():
    decision = routelab.RoutingDecision(
        token_index=torch.tensor([0, 1]), expert_index=torch.tensor([2, 2]),
        weight=torch.tensor([0.5, 1.0], dtype=torch.float64), num_tokens=2, num_experts=4,
    )
    bank = _bank(4, 6, 5, seed=0)
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    y = _routed(bank, x, decision)
    y.sum().backward()
    for grad in (bank.w_gate_up.grad, bank.w_down.grad):
        assert grad is not None and grad[2].abs().sum() > 0
        assert torch.count_nonzero(grad[[0, 1, 3]]) == 0


def test_no_grad_forward_equals_autograd_forward():
    """The sort-based kernel gives the same bits with and without autograd (the tiny-S decode path, which only
    no-grad forwards take, is checked against the fp64 reference in tests/test_gathered_swiglu.py)."""
    decision = _random_decision(50, 8, 2, seed=3, dtype=torch.float32)
    bank = _bank(8, 16, 24, seed=3, dtype=torch.float32)
    x = torch.randn(50, 16)
    sort_based = LocalDispatcher(decode_fast_path=False)
    with_graph = sort_based.fused(x, decision, bank)
    with torch.no_grad():
        without = sort_based.fused(x, decision, bank)
    torch.testing.assert_close(without, with_graph, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fused_and_generic_paths_agree(dtype, tol):
    """The generic path (gather rows → forward → combine) is what banks with extra options fall back to."""
    T, E, k, D, F = 57, 8, 3, 24, 20
    decision = _random_decision(T, E, k, seed=5, dtype=dtype)
    fused, generic = _bank(E, D, F, seed=5, dtype=dtype), _bank(E, D, F, seed=5, dtype=dtype)
    generic.fused = False
    assert DISPATCHER.can_fuse(fused) and not DISPATCHER.can_fuse(generic)
    x1 = torch.randn(T, D, dtype=dtype, requires_grad=True)
    x2 = _leaf(x1)
    w1, w2 = _leaf(decision.weight), _leaf(decision.weight)
    y1 = _routed(fused, x1, dataclasses.replace(decision, weight=w1))
    y2 = _routed(generic, x2, dataclasses.replace(decision, weight=w2))
    torch.testing.assert_close(y1, y2, rtol=tol, atol=tol)
    upstream = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, [x1, w1, fused.w_gate_up, fused.w_down], upstream)
    g2 = torch.autograd.grad(y2, [x2, w2, generic.w_gate_up, generic.w_down], upstream)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_bf16_stays_close_to_fp32():
    decision = _random_decision(64, 8, 2, seed=7, dtype=torch.float32)
    bank = _bank(8, 32, 48, seed=7, dtype=torch.float32)
    x = torch.randn(64, 32)
    y32 = _routed(bank, x, decision)
    y16 = _routed(bank.to(torch.bfloat16), x.to(torch.bfloat16), decision)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("sizes,workers", [([3, 0, 5, 1, 0, 7], 2), ([0, 0, 4], 3), ([1] * 9, 4), ([], 2),
                                           ([0, 0], 2), ([100, 1, 1], 2), ([2, 2, 2, 2], 1), ([5] * 8, 2)])
def test_split_groups_cuts_the_groups_into_contiguous_runs(sizes, workers):
    """Every non-empty group lands in exactly one run, in expert order; at most `workers` runs, none empty (but
    one when there is nothing to do), and an expert's rows never straddle two runs."""
    runs = split_groups(sizes, workers)
    flat = [group for run in runs for group in run]
    starts = [sum(sizes[:e]) for e in range(len(sizes))]
    assert flat == [(e, starts[e], starts[e] + n) for e, n in enumerate(sizes) if n]
    assert 1 <= len(runs) <= max(1, workers)
    assert all(runs) or runs == [[]]
    if sizes == [5] * 8:  # equal groups split evenly
        assert [len(run) for run in runs] == [4, 4]


def test_dispatcher_gives_threads_whole_experts_and_restores_the_thread_count():
    """With two intra-op threads a training-size call runs on two workers (`LocalDispatcher.workers`); outputs and
    every gradient still equal the fp64 per-assignment loop, and the caller's thread count is what it was."""
    T, E, k, D, F = 160, 8, 8, 48, 40  # (1280 + 8)·3·48·40 ≥ SPLIT_MIN_WORK
    decision = _random_decision(T, E, k, seed=11)
    bank = _bank(E, D, F, seed=11)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    weight = _leaf(decision.weight)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert DISPATCHER.workers(decision.num_assignments, E, D, F, x.device) == 2
        assert DISPATCHER.workers(100, E, D, F, x.device) == 1  # too little work
        assert DISPATCHER.workers(8 * 600, E, D, F, x.device) == 1  # 600 rows per expert: coarse experts
        y = DISPATCHER.fused(x, dataclasses.replace(decision, weight=weight), bank)
        grads = torch.autograd.grad(y.square().sum(), [x, weight, bank.w_gate_up, bank.w_down])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    x_ref, weight_ref, wgu_ref, wd_ref = _leaf(x), _leaf(decision.weight), _leaf(bank.w_gate_up), _leaf(bank.w_down)
    y_ref = _reference(x_ref, dataclasses.replace(decision, weight=weight_ref), wgu_ref, wd_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    ref_grads = torch.autograd.grad(y_ref.square().sum(), [x_ref, weight_ref, wgu_ref, wd_ref])
    for name, g, g_ref in zip(["x", "weight", "w_gate_up", "w_down"], grads, ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_autocast_runs_the_experts_in_its_dtype(threads):
    """Under torch.autocast the routed experts compute as autocast computes a matmul: in bf16, the gradients flowing
    back to the fp32 parameters. Reference: the fp64 per-assignment loop on the bf16-rounded input and weights."""
    T, E, k, D, F = 200, 8, 6, 48, 40  # at 2 threads the split path runs too
    decision = _random_decision(T, E, k, seed=13, dtype=torch.float32)
    bank = _bank(E, D, F, seed=13, dtype=torch.float32)
    x = torch.randn(T, D, requires_grad=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = DISPATCHER.fused(x, decision, bank)
        y.float().square().sum().backward()
    finally:
        torch.set_num_threads(previous)
    assert y.dtype == torch.bfloat16
    assert x.grad.dtype == torch.float32 and bank.w_gate_up.grad.dtype == torch.float32
    rounded = [t.detach().to(torch.bfloat16).double().requires_grad_(True) for t in (x, bank.w_gate_up, bank.w_down)]
    y_ref = _reference(rounded[0], dataclasses.replace(decision, weight=decision.weight.double()), *rounded[1:])
    def relative_error(got, want):  # bf16 keeps ~3 significant digits: compare whole tensors, not elements
        return float((got.double() - want).norm() / want.norm().detach())

    assert relative_error(y.detach(), y_ref.detach()) < 1e-2
    y_ref.square().sum().backward()
    for name, got, ref in zip(("x", "w_gate_up", "w_down"), (x.grad, bank.w_gate_up.grad, bank.w_down.grad), rounded):
        assert relative_error(got, ref.grad) < 2e-2, name


def _split_in_child(queue, args):
    queue.put(routed_swiglu(*args, workers=2).tolist())  # plain floats: a tensor would travel as shared memory


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_splits_experts_too():
    """The worker pool's threads do not survive fork: a child process (multiprocessing's fork start method) that
    splits experts after its parent did must get its own pool, not wait forever on the parent's."""
    decision = _random_decision(40, 8, 2, seed=17, dtype=torch.float32)
    plan = make_plan(decision)
    bank = _bank(8, 12, 10, seed=17, dtype=torch.float32)
    args = (torch.randn(40, 12), plan.token_S, plan.weight_S, plan.group_sizes_E.tolist(), bank.w_gate_up.detach(),
            bank.w_down.detach())
    parent = routed_swiglu(*args, workers=2)  # the parent's pool exists now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_split_in_child, args=(queue, args))
    child.start()
    try:
        got = queue.get(timeout=60)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    torch.testing.assert_close(torch.tensor(got), parent, rtol=0, atol=0)

"""Expert parallelism on spawned gloo groups (2 and 4 ranks), fp64, against one process on all ranks' tokens.

Every rank checks: its outputs, the input gradient of its tokens, the router and shared-expert gradients after the
all-reduce, and its slice of the expert gradients (never summed over ranks: the doubled-gradient bug) — against
the unsharded layer run on the concatenated tokens. Batch-coupled routers (expert choice) are checked against the
unsharded layer routing each rank's tokens as its own batch. Edge cases: a rank with zero tokens, experts with
zero tokens, every token on one rank's experts; least-loaded balancing changes nothing but the loads.
"""

import copy

import pytest
import torch
import torch.distributed as dist

import routelab
import routelab.distributed as rd
from ep_harness import run_group

D, F = 6, 5


class FixedRouter(routelab.Router):
    """Routes token t to experts chosen by a rule (a stand-in for a skewed router), weights from a linear gate."""

    def __init__(self, *, d_model, num_experts, rule):
        super().__init__(d_model=d_model, num_experts=num_experts)
        self.gate = torch.nn.Linear(d_model, num_experts, bias=False)
        self.rule = rule

    def forward(self, x_TD, ctx=None):
        T = x_TD.shape[0]
        k = len(self.rule(0))
        expert_TK = torch.tensor([self.rule(t) for t in range(T)], dtype=torch.long).reshape(T, k)
        probs_TE = torch.softmax(self.gate(x_TD), dim=-1)
        weight_TK = probs_TE.gather(1, expert_TK)
        return routelab.RoutingDecision(
            token_index=torch.arange(T).repeat_interleave(k), expert_index=expert_TK.reshape(-1),
            weight=weight_TK.reshape(-1), num_tokens=T, num_experts=self.num_experts,
        )


def _layer(E, router="topk", shared=1, seed=0, **options):
    torch.manual_seed(seed)
    if router == "fixed":
        r = FixedRouter(d_model=D, num_experts=E, **options)
    else:
        r = routelab.create_router(router, d_model=D, num_experts=E, **options)
    return routelab.MoELayer(D, F, r, shared_experts=shared).double()


def _tokens(sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, D, dtype=torch.float64, generator=g) for n in sizes]
    ups = [torch.randn(n, D, dtype=torch.float64, generator=g) for n in sizes]
    return xs, ups


def _check_against_reference(rank, world, layer, sizes, *, coupled=False, least_loaded=False):
    """Run `layer` expert-parallel on rank's tokens and compare with a reference copy in this process."""
    ref = copy.deepcopy(layer)
    xs, ups = _tokens(sizes)
    # The reference: one process, all tokens concatenated (or each rank's batch on its own, for coupled routers).
    x_ref = [x.clone().requires_grad_(True) for x in xs]
    if coupled:
        y_ref = [ref(x) for x in x_ref]
    else:
        y_cat = ref(torch.cat(x_ref))
        y_ref = list(y_cat.split(sizes))
    sum((y * u).sum() for y, u in zip(y_ref, ups)).backward()

    rd.expert_parallel(layer, least_loaded=least_loaded)
    L = layer.router.num_experts // world
    assert layer.experts.w_gate_up.shape[0] == L and layer.experts.num_experts == L
    x = xs[rank].clone().requires_grad_(True)
    y = layer(x)
    (y * ups[rank]).sum().backward()
    rd.all_reduce_replicated_grads(layer)

    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y, y_ref[rank].detach(), **tol)
    torch.testing.assert_close(x.grad, x_ref[rank].grad, **tol)
    for name, p in layer.named_parameters():
        p_ref = dict(ref.named_parameters())[name]
        g_ref = torch.zeros_like(p_ref) if p_ref.grad is None else p_ref.grad
        if name.startswith("experts."):
            g_ref = g_ref[rank * L : (rank + 1) * L]  # this rank's slice, never a sum over ranks
        g = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(g, g_ref, **tol, msg=lambda m, n=name: f"rank {rank}, grad of {n}: {m}")
    return layer


def _scenarios_two(rank, world):
    # Token-choice top-k with a shared expert; uneven token counts.
    _check_against_reference(rank, world, _layer(4, k=2), [5, 8])
    # A rank with zero tokens.
    _check_against_reference(rank, world, _layer(4, k=2, seed=1), [9, 0])
    # Every token on expert 0 (rank 0's), other experts empty; and with least-loaded balancing.
    for ll in (False, True):
        _check_against_reference(rank, world, _layer(4, "fixed", seed=2, rule=lambda t: [0]), [6, 7],
                                 least_loaded=ll)
    # Least-loaded with a helper rank that has no tokens of its own.
    _check_against_reference(rank, world, _layer(4, "fixed", seed=6, rule=lambda t: [0, 1]), [9, 0],
                             least_loaded=True)
    # Batch-coupled: expert choice routes each rank's tokens as its own batch.
    _check_against_reference(rank, world, _layer(4, "expert_choice", seed=3), [8, 6], coupled=True)
    _statistics(rank, world)


def _scenarios_four(rank, world):
    _check_against_reference(rank, world, _layer(8, k=2, seed=4), [3, 0, 6, 5])
    # Skewed (all rows on rank 0's experts 0 and 1) with least-loaded balancing: exact, and the loads drop.
    layer = _check_against_reference(rank, world, _layer(8, "fixed", seed=5, rule=lambda t: [t % 2, 1 - t % 2]),
                                     [7, 5, 6, 4], least_loaded=True)
    decision = layer.router(torch.randn(6, D, dtype=torch.float64))
    plan = layer.dispatcher.make_plan(decision)
    loads = [0] * world
    all_recv = torch.tensor([int(plan.counts_J.sum())])
    gathered = [torch.zeros_like(all_recv) for _ in range(world)]
    dist.all_gather(gathered, all_recv)
    loads = [int(t) for t in gathered]
    total = 6 * world * 2
    assert plan.moves and max(loads) <= 1.3 * total / world, loads


@pytest.mark.timeout(150)
def test_two_ranks_match_one_process_and_make_router_statistics_global():
    run_group(_scenarios_two, 2)


@pytest.mark.timeout(150)
def test_four_ranks_match_one_process_with_and_without_least_loaded():
    run_group(_scenarios_four, 4)


def _bad_inputs(rank, world):
    with pytest.raises(ValueError, match="num_experts=3 .* not divisible by the group size 2"):
        rd.expert_parallel(_layer(3))
    # Different models on the ranks: a clear error on every rank, not a hang in a later collective.
    with pytest.raises(ValueError, match="differs across ranks"):
        rd.expert_parallel(_layer(4 if rank == 0 else 6))
    with pytest.raises(ValueError, match="differs across ranks"):
        rd.expert_parallel(_layer(4), least_loaded=rank == 1)
    layer = rd.expert_parallel(_layer(4))
    with pytest.raises(ValueError, match="already expert-parallel"):
        rd.expert_parallel(layer)


@pytest.mark.timeout(150)
def test_bad_input_errors_on_every_rank():
    run_group(_bad_inputs, 2)


def test_uninitialised_group_is_a_clear_error():
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        rd.expert_parallel(_layer(4))


def _statistics(rank, world):
    """Routers under a group make the update a single process would make on all ranks' tokens."""
    xs, _ = _tokens([6, 6], seed=7)
    cases = [
        ("topk", dict(k=2, balance="loss_free", bias_update_rate=0.1), "expert_bias"),
        ("topk", dict(k=1, balance="bip"), "bip_dual"),
        ("kmeans", dict(k=2, init="random", momentum=0.5), "centroids"),
        ("kmeans", dict(k=2, init="first_batch"), "centroids"),
    ]
    for name, options, buffer in cases:
        layer = _layer(4, name, shared=0, seed=8, **options)
        ref = copy.deepcopy(layer)
        if name == "topk" and options["balance"] == "bip" or options.get("init") == "first_batch":
            # per-batch statistics (BIP duals: the mean of each rank's duals; k-means' sample: rank 0's batch)
            for x in xs:
                ref(x)
        else:
            ref(torch.cat(xs))
        routelab.update_routers(ref)
        rd.expert_parallel(layer)
        layer(xs[rank])
        routelab.update_routers(layer)
        got, want = getattr(layer.router, buffer), getattr(ref.router, buffer)
        assert not torch.equal(want, getattr(_layer(4, name, shared=0, seed=8, **options).router, buffer)), name
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name} {options}: {m}")
    # The Switch aux loss: f from every rank's counts, P from this rank's tokens; the ranks' mean is the global loss.
    layer = _layer(4, "topk", shared=0, seed=9, k=2, aux_loss_coef=1.0)
    ref = copy.deepcopy(layer)
    ref(torch.cat(xs))
    rd.expert_parallel(layer)
    layer(xs[rank])
    aux = layer.last_decision.aux_losses["aux"].detach().reshape(1)
    dist.all_reduce(aux)
    torch.testing.assert_close(aux[0] / world, ref.last_decision.aux_losses["aux"].detach(), rtol=1e-10, atol=0)

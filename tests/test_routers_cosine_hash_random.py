"""cosine (ROUTERS.md §8), hash and random_fixed (§9): scale invariance, parameter counts, gradients; hash is a
function of the id alone, balanced, and needs token_ids; frozen routers have no trainable parameters."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import routelab

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_cosine_routing_is_invariant_to_the_scale_of_x_and_of_centroids():
    torch.manual_seed(0)
    router = routelab.create_router("cosine", d_model=16, num_experts=8, k=2)
    x = torch.randn(50, 16)
    base = router(x)
    for alpha in (0.25, 4.0, 1024.0):  # powers of two: αx is exact, so the decision must be too
        d = router(alpha * x)
        assert torch.equal(d.expert_index, base.expert_index)
        torch.testing.assert_close(d.weight, base.weight, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        router.centroids.mul_(torch.rand(8, 1) + 0.5)
    d = router(x)
    assert torch.equal(d.expert_index, base.expert_index)
    torch.testing.assert_close(d.weight, base.weight, rtol=1e-5, atol=1e-6)


def test_cosine_weights_match_hand_computation():
    torch.manual_seed(1)
    router = routelab.create_router("cosine", d_model=6, num_experts=4, d_space=3, k=1, temperature_init=5.0)
    x = torch.randn(5, 6)
    d = router(x)
    P, C = router.proj.weight.detach(), router.centroids.detach()
    for t in range(5):
        q = P @ x[t]
        cos = torch.stack([q @ C[e] / (q.norm() * C[e].norm()) for e in range(4)])
        probs = torch.softmax(5.0 * cos, 0)
        assert d.expert_index[t].item() == int(probs.argmax())
        assert d.weight[t].item() == pytest.approx(probs.max().item(), rel=1e-5)


def test_cosine_parameter_count_matches_the_paper_ratio():
    d, E = 512, 1024
    router = routelab.create_router("cosine", d_model=d, num_experts=E)
    n = sum(p.numel() for p in router.parameters())
    assert n == 64 * d + 64 * E + 1
    assert d * E / n == pytest.approx(5.33, abs=0.01)


def test_cosine_k1_task_loss_reaches_projection_centroids_and_temperature():
    torch.manual_seed(2)
    router = routelab.create_router("cosine", d_model=8, num_experts=4, aux_loss_coef=0.0)
    layer = routelab.MoELayer(8, 6, router)
    layer(torch.randn(20, 8)).square().sum().backward()
    for p in (router.proj.weight, router.centroids, router.temperature):
        assert p.grad is not None and p.grad.abs().sum() > 0


def _hash_route(router, ids):
    ids = torch.as_tensor(ids).reshape(1, -1)
    x = torch.randn(ids.shape[1], 8)
    d = router(x, routelab.RoutingContext(token_ids=ids))
    return dict(zip(d.token_index.tolist(), d.expert_index.tolist()))


def test_hash_is_a_function_of_the_id_alone():
    router = routelab.create_router("hash", d_model=8, num_experts=8)
    first = _hash_route(router, [5, 17, 5, 99, 3])
    assert first[0] == first[2]
    again = _hash_route(router, [99, 1, 2, 17, 5, 3])  # other positions, contexts, x
    assert again[0] == first[3] and again[3] == first[1] and again[4] == first[0] and again[5] == first[4]
    other_seed = routelab.create_router("hash", d_model=8, num_experts=8, seed=1)
    ids = list(range(64))
    assert _hash_route(other_seed, ids) != _hash_route(router, ids)
    d = router(torch.randn(3, 8), routelab.RoutingContext(token_ids=torch.tensor([1, 2, 3])))
    assert torch.all(d.weight == 1) and torch.all(d.experts_per_token() == 1)


def test_hash_loads_are_binomially_balanced():
    g = torch.Generator().manual_seed(0)
    n, E = 8000, 8
    ids = torch.randint(0, 1_000_000, (n,), generator=g)
    router = routelab.create_router("hash", d_model=4, num_experts=E)
    load = router(torch.zeros(n, 4), routelab.RoutingContext(token_ids=ids)).expert_load().double()
    sd = (n * (1 / E) * (1 - 1 / E)) ** 0.5
    assert (load - n / E).abs().max() < 4 * sd
    consecutive = router(torch.zeros(n, 4), routelab.RoutingContext(token_ids=torch.arange(n))).expert_load().double()
    assert (consecutive - n / E).abs().max() < 4 * sd


def test_hash_needs_token_ids():
    router = routelab.create_router("hash", d_model=8, num_experts=4)
    with pytest.raises(ValueError, match="token_ids"):
        router(torch.randn(3, 8))
    with pytest.raises(ValueError, match="token_ids"):
        router(torch.randn(3, 8), routelab.RoutingContext(token_ids=torch.tensor([1, 2])))


@pytest.mark.parametrize("name,options", [("hash", {}), ("random_fixed", dict(k=2)), ("kmeans", {})])
def test_frozen_routers_have_no_trainable_parameters_and_training_changes_no_decision(name, options):
    torch.manual_seed(3)
    router = routelab.create_router(name, d_model=8, num_experts=4, **options)
    assert list(router.parameters()) == []
    layer = routelab.MoELayer(8, 6, router).eval()
    x, ctx = torch.randn(12, 8), routelab.RoutingContext(token_ids=torch.arange(12))
    before = layer.forward_with_decision(x, ctx)[1]
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(3):
        layer(torch.randn(12, 8), ctx).square().mean().backward()
        opt.step()
    after = layer.forward_with_decision(x, ctx)[1]
    assert torch.equal(before.expert_index, after.expert_index) and torch.equal(before.weight, after.weight)


def test_random_fixed_is_seeded_and_matches_softmax_topk():
    a = routelab.create_router("random_fixed", d_model=8, num_experts=4, seed=5)
    b = routelab.create_router("random_fixed", d_model=8, num_experts=4, seed=5)
    c = routelab.create_router("random_fixed", d_model=8, num_experts=4, seed=6)
    assert torch.equal(a.gate_weight, b.gate_weight) and not torch.equal(a.gate_weight, c.gate_weight)
    x = torch.randn(10, 8)
    d = a(x)
    probs = torch.softmax(x @ a.gate_weight.T, -1)
    assert d.expert_index.tolist() == probs.argmax(-1).tolist()
    torch.testing.assert_close(d.weight, probs.max(-1).values)


def test_seeded_routers_are_the_same_in_another_process():
    """hash and random_fixed draw nothing from process state (PYTHONHASHSEED, the global torch RNG)."""
    code = (
        "import torch, routelab; torch.manual_seed(123);"
        "h = routelab.create_router('hash', d_model=4, num_experts=8, seed=3);"
        "d = h(torch.zeros(20, 4), routelab.RoutingContext(token_ids=torch.arange(20) * 7919));"
        "r = routelab.create_router('random_fixed', d_model=4, num_experts=8, seed=3);"
        "print(d.expert_index.tolist(), r.gate_weight.sum().item())"
    )
    env = dict(os.environ, PYTHONPATH=SRC, PYTHONHASHSEED="17", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    h = routelab.create_router("hash", d_model=4, num_experts=8, seed=3)
    d = h(torch.zeros(20, 4), routelab.RoutingContext(token_ids=torch.arange(20) * 7919))
    r = routelab.create_router("random_fixed", d_model=4, num_experts=8, seed=3)
    assert out.strip() == f"{d.expert_index.tolist()} {r.gate_weight.sum().item()}"


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("cosine", dict(d_space=0), "d_space"),
        ("cosine", dict(k=5), "k must be"),
        ("cosine", dict(temperature_init=0), "temperature_init"),
        ("cosine", dict(centroid_init="zeros"), "centroid_init must be one of"),
        ("hash", dict(seed=-1), "seed"),
        ("hash", dict(seed=1.5), "seed"),
        ("random_fixed", dict(k=0), "k must be"),
        ("random_fixed", dict(normalize="true"), "normalize must be one of"),
    ],
)
def test_invalid_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        routelab.create_router(name, d_model=8, num_experts=4, **options)

"""The contract objects, the registry and argument validation."""

import pytest
import torch

import routelab


def _decision(**changes):
    fields = dict(
        token_index=torch.tensor([0, 0, 2]),
        expert_index=torch.tensor([1, 3, 1]),
        weight=torch.tensor([0.25, 0.75, 1.0]),
        num_tokens=3,
        num_experts=4,
    )
    fields.update(changes)
    return routelab.RoutingDecision(**fields)


def test_decision_helpers():
    d = _decision()
    assert d.expert_load().tolist() == [0, 2, 0, 1]
    assert d.experts_per_token().tolist() == [2, 0, 1]
    expected = torch.zeros(3, 4)
    expected[0, 1], expected[0, 3], expected[2, 1] = 0.25, 0.75, 1.0
    assert torch.equal(d.dense_weights(), expected)
    with pytest.raises(Exception):
        d.num_tokens = 5  # frozen


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(expert_index=torch.tensor([1, 4, 1])), "expert_index must lie in"),
        (dict(expert_index=torch.tensor([1, -1, 1])), "expert_index must lie in"),
        (dict(token_index=torch.tensor([0, 3, 1])), "token_index must lie in"),
        (dict(weight=torch.tensor([1.0, 2.0])), "equal lengths"),
        (dict(token_index=torch.tensor([0.0, 1.0, 2.0])), "token_index must be int64"),
        (dict(weight=torch.tensor([1, 2, 3])), "weight must be floating"),
        (dict(router_logits=torch.zeros(2, 4)), "router_logits"),
        (dict(aux_losses={"aux": torch.zeros(2)}), "aux_losses"),
    ],
)
def test_decision_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        _decision(**changes)


def test_registry_lists_and_rejects():
    assert "topk" in routelab.list_routers()
    with pytest.raises(ValueError, match="valid names: .*topk"):
        routelab.create_router("nope", d_model=4, num_experts=2)
    with pytest.raises(ValueError, match="no option.*kk.*valid options: .*k"):
        routelab.create_router("topk", d_model=4, num_experts=2, kk=1)
    with pytest.raises(ValueError, match="already registered"):
        routelab.register_router("topk")(type("Other", (routelab.Router,), {}))


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(k=0), "k must be"),
        (dict(k=9), "k must be"),
        (dict(capacity_factor=0), "capacity_factor"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(aux_loss_coef=-0.1), "aux_loss_coef"),
        (dict(z_loss_coef=-1), "z_loss_coef"),
        (dict(drop_policy="random"), "drop_policy must be one of 'probs', 'position'"),
        (dict(normalize="softmax"), "normalize must be one of"),
        (dict(k=1, normalize="selected"), "normalize=\"selected\" with k=1"),
        (dict(score="relu"), "score must be one of"),
        (dict(balance="aux"), "balance must be one of"),
        (dict(n_group=3, topk_group=1), "n_group must be a positive divisor"),
        (dict(n_group=4), "must be set together"),
        (dict(n_group=4, topk_group=5), "topk_group must be"),
        (dict(n_group=4, topk_group=1, k=3), "fewer than k"),
        (dict(jitter=1.5), "jitter"),
        (dict(scaling=0), "scaling"),
        (dict(bias_update_rate=-1e-3), "bias_update_rate"),
    ],
)
def test_topk_invalid_options(options, match):
    with pytest.raises(ValueError, match=match):
        routelab.create_router("topk", d_model=4, num_experts=8, **options)


@pytest.mark.parametrize("name,value", [("d_model", 0), ("num_experts", -2), ("num_experts", 1.5)])
def test_router_sizes_validated(name, value):
    kwargs = dict(d_model=4, num_experts=4)
    kwargs[name] = value
    with pytest.raises(ValueError, match=name):
        routelab.create_router("topk", k=1, **kwargs)


def test_layer_input_errors():
    layer = routelab.MoELayer(8, 16, routelab.create_router("topk", d_model=8, num_experts=4))
    with pytest.raises(ValueError, match="d_model=8"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="router.d_model"):
        routelab.MoELayer(16, 16, routelab.create_router("topk", d_model=8, num_experts=4))
    with pytest.raises(ValueError, match="shared_experts"):
        routelab.MoELayer(8, 16, routelab.create_router("topk", d_model=8, num_experts=4), shared_experts=-1)
    with pytest.raises(TypeError, match="router must be"):
        routelab.MoELayer(8, 16, torch.nn.Linear(8, 4))
    with pytest.raises(TypeError, match="dispatcher must be"):
        routelab.MoELayer(8, 16, routelab.create_router("topk", d_model=8, num_experts=4), dispatcher="local")
    with pytest.raises(ValueError, match="padding_mask"):
        layer(torch.randn(2, 3, 8), routelab.RoutingContext(padding_mask=torch.zeros(2, 4, dtype=torch.bool)))


def test_total_aux_loss_sums_layers_with_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        routelab.MoELayer(8, 16, routelab.create_router("topk", d_model=8, num_experts=4, z_loss_coef=1e-3)),
        routelab.MoELayer(8, 16, routelab.create_router("topk", d_model=8, num_experts=4)),
    )
    model(torch.randn(10, 8))
    total = routelab.total_aux_loss(model)
    expected = sum(sum(m.last_decision.aux_losses.values()) for m in model)
    assert total.dim() == 0 and total.requires_grad
    torch.testing.assert_close(total, expected)
    total.backward()
    assert model[0].router.gate.weight.grad is not None


def test_loss_free_bias_moves_selection_not_weights():
    torch.manual_seed(0)
    router = routelab.create_router("topk", d_model=8, num_experts=4, k=1, balance="loss_free", bias_update_rate=0.01)
    assert "expert_bias" in dict(router.named_buffers())
    assert all("bias" not in name for name, _ in router.named_parameters())
    x = torch.randn(64, 8)
    before = router(x)
    load = before.expert_load().double()
    routelab.update_routers(router)
    assert torch.equal(router.expert_bias, (0.01 * torch.sign(load.mean() - load)).float())
    router.eval()
    snapshot = router.expert_bias.clone()
    router(x)
    routelab.update_routers(router)
    assert torch.equal(router.expert_bias, snapshot)  # eval forwards accumulate nothing
    router.train()
    after = router(x)
    same = (before.dense_weights() > 0) & (after.dense_weights() > 0)
    torch.testing.assert_close(after.dense_weights()[same], before.dense_weights()[same], rtol=0, atol=0)


def test_group_limited_selection_touches_at_most_topk_group_groups():
    torch.manual_seed(0)
    router = routelab.create_router("topk", d_model=16, num_experts=16, k=4, n_group=4, topk_group=2)
    d = router(torch.randn(200, 16))
    groups = torch.zeros(200, 4, dtype=torch.bool)
    groups[d.token_index, d.expert_index // 4] = True
    assert groups.sum(-1).max() <= 2
    assert torch.all(d.experts_per_token() == 4)


def test_half_precision_model_keeps_router_state_in_full_precision():
    router = routelab.create_router("topk", d_model=8, num_experts=4, k=1, balance="loss_free", bias_update_rate=1e-3)
    layer = routelab.MoELayer(8, 16, router).to(torch.bfloat16)
    assert router.gate.weight.dtype == torch.bfloat16
    assert router.expert_bias.dtype == torch.float32 and router._pending_load.dtype == torch.float64
    for _ in range(3):
        layer(torch.randn(300, 8, dtype=torch.bfloat16))
    assert int(router._pending_load.sum()) == 900  # exact counts, beyond bf16's 256 integer range
    routelab.update_routers(layer)
    assert set(router.expert_bias.abs().tolist()) <= {0.0, torch.tensor(1e-3).item()}


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(aux_loss_coef=float("nan")), "aux_loss_coef"),
        (dict(aux_loss_coef=True), "aux_loss_coef"),
        (dict(z_loss_coef=float("inf")), "z_loss_coef"),
        (dict(scaling=float("nan")), "scaling"),
        (dict(capacity_factor=float("inf")), "capacity_factor"),
        (dict(bip_iters=2.0), "bip_iters"),
    ],
)
def test_topk_rejects_non_finite_and_bool_numbers(options, match):
    with pytest.raises(ValueError, match=match):
        routelab.create_router("topk", d_model=4, num_experts=8, **options)

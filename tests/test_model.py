"""MoETransformerLM and DynaMoE k schedules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import routelab
from routelab.layers.moe import total_aux_loss
from routelab.models import K_SCHEDULE_SHAPES, ModelConfig, MoETransformerLM, k_schedule
from routelab.routing import registry
from routelab.routing.base import Router, RoutingContext, RoutingDecision

TINY = dict(vocab_size=97, d_model=32, n_layers=3, n_heads=2, d_ff=48, num_experts=4, max_seq_len=32)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.sampled_from(K_SCHEDULE_SHAPES),
    layers=st.integers(1, 12),
    k_max=st.integers(1, 8),
    data=st.data(),
)
def test_k_schedule_integers_in_range_and_budget_matched(shape, layers, k_max, data):
    k = data.draw(st.integers(1, k_max))
    ks = k_schedule(shape, layers, k_max=k_max, k=k)
    assert len(ks) == layers and all(isinstance(v, int) and 1 <= v <= k_max for v in ks)
    assert sum(ks) == k * layers  # budget matching: the layer mean equals uniform k exactly
    raw = k_schedule(shape, layers, k_max=k_max, match_budget=False)
    assert all(1 <= v <= k_max for v in raw)


def test_k_schedule_shapes():
    assert k_schedule("uniform", 4, k_max=4, k=2) == [2, 2, 2, 2]
    assert k_schedule("descending", 4, k_max=4, match_budget=False) == [4, 3, 2, 1]
    assert k_schedule("ascending", 4, k_max=4, match_budget=False) == [1, 2, 3, 4]
    pyramid = k_schedule("pyramid", 5, k_max=3, match_budget=False)
    assert pyramid == [1, 2, 3, 2, 1]
    wave = k_schedule("wave", 5, k_max=3, match_budget=False)
    assert wave[0] == wave[-1] == 3 and min(wave) == wave[2] == 1
    desc = k_schedule("descending", 8, k_max=4, k=2)
    assert desc == sorted(desc, reverse=True) and desc[0] > desc[-1]
    with pytest.raises(ValueError, match="shape must be one of"):
        k_schedule("zigzag", 4, k_max=4, k=2)
    with pytest.raises(ValueError, match="k must be an integer in"):
        k_schedule("descending", 4, k_max=2, k=3)


def test_forward_shapes_loss_and_tied_embeddings():
    torch.manual_seed(0)
    model = MoETransformerLM(ModelConfig(**TINY))
    ids = torch.randint(0, 97, (2, 16))
    logits, loss = model(ids[:, :-1], ids[:, 1:])
    assert logits.shape == (2, 15, 97)
    ce = F.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ce + total_aux_loss(model))
    assert total_aux_loss(model).item() > 0  # top-k's Switch loss is added
    assert model(ids)[1] is None
    names = [n for n, _ in model.named_parameters()]
    assert not any("lm_head" in n for n in names)  # the output projection is the embedding matrix
    loss.backward()
    assert model.embed.weight.grad is not None
    for layer in model.moe_layers:  # the routers learn through the combine weights and the aux loss
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.router.parameters())


def test_moe_every_places_moe_layers_and_dense_elsewhere():
    model = MoETransformerLM(ModelConfig(**{**TINY, "n_layers": 4, "moe_every": 2}))
    kinds = [type(b.ffn).__name__ for b in model.blocks]
    assert kinds == ["DenseSwiGLU", "MoELayer", "DenseSwiGLU", "MoELayer"]


def test_k_schedule_sets_router_k_per_layer():
    schedule = {"shape": "descending", "k_max": 3}
    cfg = ModelConfig(**{**TINY, "n_layers": 4}, router_options={"k": 2}, k_schedule=schedule)
    model = MoETransformerLM(cfg)
    assert [layer.router.k for layer in model.moe_layers] == [3, 2, 2, 1]
    with pytest.raises(ValueError, match="k_schedule has no field"):
        MoETransformerLM(ModelConfig(**TINY, k_schedule={"shape": "descending", "k_max": 3, "kmax": 2}))


def test_causal_model_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = MoETransformerLM(ModelConfig(**TINY)).eval()
    ids = torch.randint(0, 97, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 97
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert model.causal


def test_unknown_router_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: .*topk"):
        MoETransformerLM(ModelConfig(**TINY, router="nope"))


class _Cell(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, d_model, bias=False)


class ContextProbeRouter(Router):
    """A test router: top-1 over a shared projection; records the context and hands on a counter as state."""

    calls_to_shared = 0

    def __init__(self, *, d_model: int, num_experts: int, cell: nn.Module | None = None) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        self.cell = cell if cell is not None else _Cell(d_model)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.seen: list[RoutingContext] = []

    @classmethod
    def shared_modules(cls, *, d_model: int, num_experts: int, **options) -> dict[str, nn.Module]:
        cls.calls_to_shared += 1
        return {"cell": _Cell(d_model)}

    def forward(self, x_TD, ctx=None):
        self.seen.append(ctx)
        logits = self.gate(self.cell.proj(x_TD))
        weight, expert = logits.softmax(-1).max(-1)
        T = x_TD.shape[0]
        previous = 0 if ctx is None or ctx.state is None else ctx.state
        return RoutingDecision(torch.arange(T), expert, weight, T, self.num_experts, state=previous + 1)


@pytest.fixture
def probe_router():
    registry.register_router("test_context_probe")(ContextProbeRouter)
    ContextProbeRouter.calls_to_shared = 0
    try:
        yield "test_context_probe"
    finally:
        registry._ROUTERS.pop("test_context_probe", None)


def test_context_flows_between_layers_and_shared_modules_are_shared(probe_router):
    torch.manual_seed(0)
    model = MoETransformerLM(ModelConfig(**TINY, router=probe_router))
    assert ContextProbeRouter.calls_to_shared == 1
    cells = {id(layer.router.cell) for layer in model.moe_layers}
    assert len(cells) == 1  # one shared cell object in every layer
    ids = torch.randint(0, 97, (2, 10))
    model(ids, step=7)
    contexts = [layer.router.seen[-1] for layer in model.moe_layers]
    assert [c.layer_index for c in contexts] == [0, 1, 2]
    assert [c.state for c in contexts] == [None, 1, 2]  # each layer receives the previous decision's state
    assert all(c.step == 7 and torch.equal(c.token_ids, ids) for c in contexts)


def test_update_routers_is_called_through_the_model():
    cfg = ModelConfig(**TINY, router_options={"k": 2, "balance": "loss_free", "bias_update_rate": 0.1})
    model = MoETransformerLM(cfg)
    model(torch.randint(0, 97, (2, 8)))
    routelab.update_routers(model)
    assert any(layer.router.expert_bias.abs().sum() > 0 for layer in model.moe_layers)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("shared_experts", True, "model.shared_experts must be an integer >= 0"),
        ("dense_d_ff", 0, "model.dense_d_ff must be a positive integer or null"),
        ("dense_d_ff", -8, "model.dense_d_ff must be a positive integer or null"),
        ("dense_d_ff", 16.5, "model.dense_d_ff must be a positive integer or null"),
        ("rope_base", float("nan"), "model.rope_base must be a finite number > 0"),
        ("d_model", True, "model.d_model must be a positive integer"),
    ],
)
def test_model_config_rejects_bools_bad_dense_width_and_non_finite_numbers(field, value, message):
    cfg = ModelConfig(**{"vocab_size": 64, "d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 16, "num_experts": 4,
                         "moe_every": 2, field: value})
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_k_schedule_budget_for_max_k_routers_and_conflicts():
    base = {**TINY, "n_layers": 4}
    sched = {"shape": "descending", "k_max": 4}

    def layer_max_k(options, schedule):
        return ModelConfig(**base, router="top_p", router_options=options, k_schedule=schedule).per_layer_router_options()

    expected_for = {b: k_schedule("descending", 4, k_max=4, k=b) for b in (1, 2, 3)}
    assert len({tuple(v) for v in expected_for.values()}) == 3  # the budget is visible in the schedule
    # top_p has no k option: the budget is the user's max_k, or the schedule's k, else 2 — never silently replaced
    assert [o["max_k"] for o in layer_max_k({"p": 0.4, "max_k": 3}, sched)] == expected_for[3]
    assert [o["max_k"] for o in layer_max_k({"p": 0.4}, {**sched, "k": 1})] == expected_for[1]
    assert [o["max_k"] for o in layer_max_k({"p": 0.4}, sched)] == expected_for[2]
    assert [o["max_k"] for o in layer_max_k({"p": 0.4, "max_k": 3}, {**sched, "k": 3})] == expected_for[3]
    with pytest.raises(ValueError, match=r"router option max_k=3 and k_schedule.k=1 both set the budget"):
        layer_max_k({"p": 0.4, "max_k": 3}, {**sched, "k": 1})
    # routers with k: the router's k is the budget, as before; the schedule's k is accepted when it agrees
    topk = ModelConfig(**base, router_options={"k": 3}, k_schedule=sched).per_layer_router_options()
    assert [o["k"] for o in topk] == expected_for[3]
    with pytest.raises(ValueError, match=r"router option k=3 and k_schedule.k=2"):
        ModelConfig(**base, router_options={"k": 3}, k_schedule={**sched, "k": 2}).per_layer_router_options()
    with pytest.raises(ValueError, match=r"k_schedule must be null or a mapping .*got \[1, 2\]"):
        ModelConfig(**base, k_schedule=[1, 2]).per_layer_router_options()

"""routelab.interop.hf against transformers' own MoE blocks, built from tiny random configs (no network).

Per family: block output and every gradient equal to the HF block (fp32 and fp64), whole-model logits unchanged
after patch_model, to_hf(from_hf(b)) bit-exact, one training step on a patched model equal to the same step on the
HF model (aux loss included), router swapping, and the error for unsupported blocks.
"""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="routelab.interop.hf needs the hf extra (transformers>=5)")

import routelab  # noqa: E402
from routelab.interop.hf import PatchedMoEBlock, from_hf, patch_model, to_hf, unpatch_model  # noqa: E402

transformers.logging.set_verbosity_error()

D = 32
COMMON = dict(
    vocab_size=64, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64,
)  # fmt: skip


def _config(family: str, experts_implementation: str = "eager"):
    kw = dict(COMMON, experts_implementation=experts_implementation)
    if family == "mixtral":
        return transformers.MixtralConfig(**kw, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **kw, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4,
            num_experts_per_tok=2,
        )  # fmt: skip
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **kw, intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=True,
        )  # fmt: skip
    if family == "olmoe":
        return transformers.OlmoeConfig(**kw, intermediate_size=24, num_experts=4, num_experts_per_tok=2)
    if family == "deepseek_v3":
        # 8 experts in 4 groups, 2 groups kept: the group limit and the correction bias both matter.
        return transformers.DeepseekV3Config(
            **kw, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
            n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
            q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
        )  # fmt: skip
    if family == "gpt_oss":
        # A small swiglu_limit so that the clamps are active on random inputs.
        return transformers.GptOssConfig(
            **kw, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8, swiglu_limit=0.3,
        )  # fmt: skip
    raise AssertionError(family)


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]
PATCHED_BLOCKS = {"deepseek_v3": 1}  # first_k_dense_replace=1: layer 0 is dense


def make_model(family: str, *, dtype=torch.float32, seed=0, experts_implementation="eager"):
    """A tiny random transformers causal LM; routers get large weights so that routing is far from uniform."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(family, experts_implementation)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            router = name.endswith(("mlp.gate.weight", "mlp.router.weight", "mlp.router.bias"))
            p.normal_(0.0, 0.5 if router else 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.2)
    return model.eval()


def moe_block(model):
    return model.model.layers[1].mlp


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def _layer_grads_as_hf(layer, block) -> dict[str, torch.Tensor]:
    """The layer's parameter gradients, named and laid out as the block's parameters (via to_hf on a copy)."""
    g_layer, g_block = copy.deepcopy(layer), copy.deepcopy(block)
    with torch.no_grad():
        for p, original in zip(g_layer.parameters(), layer.parameters()):
            p.copy_(original.grad)
    to_hf(g_layer, g_block)
    return dict(g_block.named_parameters())


TOL = {torch.float32: 1e-5, torch.float64: 1e-6}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", FAMILIES)
def test_block_output_and_gradients_match_hf(family, dtype):
    block = moe_block(make_model(family, dtype=dtype))
    layer = from_hf(block)
    x_h = torch.randn(3, 7, D, dtype=dtype, requires_grad=True)
    x_r = x_h.detach().clone().requires_grad_(True)
    y_h, y_r = _out(block(x_h)), layer(x_r)
    assert y_r.dtype == y_h.dtype and y_r.shape == y_h.shape
    # transformers routes in fp32 even for fp64 models (gpt-oss excepted), so fp64 agrees to fp32 rounding of the
    # routing weights; gpt-oss computes everything in the model dtype.
    atol = 1e-12 if (family == "gpt_oss" and dtype == torch.float64) else TOL[dtype]
    torch.testing.assert_close(y_r, y_h, atol=atol, rtol=0)

    upstream = torch.randn_like(y_h)
    (y_h * upstream).sum().backward()
    (y_r * upstream).sum().backward()
    torch.testing.assert_close(x_r.grad, x_h.grad, atol=atol, rtol=0)
    grads = _layer_grads_as_hf(layer, block)
    for name, p in block.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_model_keeps_logits_and_unpatch_restores_bits(family):
    # transformers' default experts implementation (grouped_mm on this machine) as the reference here.
    model = make_model(family, experts_implementation=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, COMMON["vocab_size"], (2, 9))
    with torch.no_grad():
        logits_hf = model(ids).logits

    assert patch_model(model) == PATCHED_BLOCKS.get(family, 2)
    assert isinstance(moe_block(model), PatchedMoEBlock)
    with torch.no_grad():
        logits_rl = model(ids).logits
    torch.testing.assert_close(logits_rl, logits_hf, atol=1e-5, rtol=0)
    assert patch_model(model) == 0  # already patched

    assert unpatch_model(model) == PATCHED_BLOCKS.get(family, 2)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits_hf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact(family, dtype):
    source = moe_block(make_model(family, dtype=dtype, seed=1))
    target = moe_block(make_model(family, dtype=dtype, seed=2))
    layer = from_hf(source)
    assert all(p.dtype == dtype for p in layer.parameters())
    for p_layer in layer.parameters():  # copies, never views of the block's storage
        assert all(p_layer.data_ptr() != p.data_ptr() for p in source.parameters())
    to_hf(layer, target)
    want, got = source.state_dict(), target.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_on_patched_model_equals_hf_step(family):
    model_hf = make_model(family).train()
    model_rl = copy.deepcopy(model_hf)
    patch_model(model_rl)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 9))
    kwargs = {"labels": ids}
    records_logits = "output_router_logits" in inspect.signature(type(model_hf).forward).parameters
    if records_logits:
        kwargs["output_router_logits"] = True  # transformers' aux loss, from the recorded router logits

    losses = []
    for model in (model_hf, model_rl):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        out = model(ids, **kwargs)
        out.loss.backward()
        opt.step()
        losses.append(out)
    torch.testing.assert_close(losses[1].loss, losses[0].loss, atol=1e-5, rtol=0)
    if records_logits:
        assert losses[0].aux_loss is not None
        torch.testing.assert_close(losses[1].aux_loss, losses[0].aux_loss, atol=1e-6, rtol=0)
        # one recorded router-logits tensor per MoE layer, not more
        assert len(losses[1].router_logits) == len(losses[0].router_logits) == PATCHED_BLOCKS.get(family, 2)

    unpatch_model(model_rl)
    if records_logits:  # transformers installed its recorders while patched: the restored routers record again
        assert len(model_rl(ids, **kwargs).router_logits) == PATCHED_BLOCKS.get(family, 2)
    want, got = model_hf.state_dict(), model_rl.state_dict()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
    # And the trained weights moved: the comparison is not vacuous.
    assert not torch.equal(moe_block(model_hf).experts.down_proj, moe_block(make_model(family)).experts.down_proj)


def _patched_layers(model):
    return [m.layer for m in model.modules() if isinstance(m, PatchedMoEBlock)]


def _run_forward_backward(model):
    ids = torch.randint(0, COMMON["vocab_size"], (2, 9))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    return out


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_swapping_topk_options_changes_routing(family):
    model = make_model(family).train()
    assert patch_model(model, k=1, normalize="none") == PATCHED_BLOCKS.get(family, 2)
    _run_forward_backward(model)
    for layer in _patched_layers(model):
        assert layer.router.k == 1
        assert torch.all(layer.last_decision.experts_per_token() == 1)
        assert layer.experts.w_gate_up.grad is not None and layer.router.gate.weight.grad is not None
    if family == "deepseek_v3":  # the family options stay (sigmoid, correction bias, groups), only k changed
        router = _patched_layers(model)[0].router
        assert router.score == "sigmoid" and router.n_group == 4 and router.scaling == 2.5


def test_swapping_router_by_name_starts_from_hf_gate():
    model = make_model("qwen3_moe")
    gate_hf = moe_block(model).gate.weight.detach().clone()
    patch_model(model, router="topk", k=3, aux_loss_coef=0.0)
    layer = moe_block(model).layer
    assert torch.equal(layer.router.gate.weight, gate_hf)
    _run_forward_backward(model.train())
    assert torch.all(layer.last_decision.experts_per_token() == 3)


def test_swapped_router_unpatch_keeps_what_it_cannot_provide():
    model = make_model("deepseek_v3")
    bias_hf = moe_block(model).gate.e_score_correction_bias.clone()
    patch_model(model, balance="none", n_group=None, topk_group=None)  # no correction bias in this router
    assert not hasattr(moe_block(model).layer.router, "expert_bias")
    with torch.no_grad():
        moe_block(model).layer.experts.w_down.mul_(2)
    down = moe_block(model).layer.experts.w_down.detach().clone()
    unpatch_model(model)
    assert torch.equal(moe_block(model).gate.e_score_correction_bias, bias_hf)
    assert torch.equal(moe_block(model).experts.down_proj, down.transpose(1, 2))
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        to_hf(from_hf(moe_block(model), balance="none", n_group=None, topk_group=None), moe_block(model))


class _ThresholdRouter(routelab.Router):
    """Test-only dynamic-k router: every expert whose softmax probability exceeds 1/E, and at least the best one."""

    def __init__(self, *, d_model: int, num_experts: int) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        self.gate = torch.nn.Linear(d_model, num_experts, bias=False)

    def forward(self, x_TD, ctx=None):
        logits_TE = self.gate(x_TD.float())
        probs_TE = logits_TE.softmax(dim=-1)
        keep_TE = probs_TE > 1.0 / self.num_experts
        keep_TE[torch.arange(x_TD.shape[0]), probs_TE.argmax(dim=-1)] = True
        token_S, expert_S = keep_TE.nonzero(as_tuple=True)
        return routelab.RoutingDecision(
            token_index=token_S, expert_index=expert_S, weight=probs_TE[token_S, expert_S],
            num_tokens=x_TD.shape[0], num_experts=self.num_experts, router_logits=logits_TE,
        )  # fmt: skip


@pytest.fixture
def threshold_router():
    """Registered for one test only (the shared contract suite parametrises over the registry at collection)."""
    from routelab.routing import registry

    routelab.register_router("test_threshold")(_ThresholdRouter)
    yield "test_threshold"
    registry._ROUTERS.pop("test_threshold")


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_swapping_to_any_registered_router(family, threshold_router):
    model = make_model(family).train()
    hf_router = getattr(moe_block(model), "router" if family == "gpt_oss" else "gate")
    gate_hf = hf_router.weight.detach().clone()
    bias_hf = hf_router.bias.detach().clone() if family == "gpt_oss" else None
    patch_model(model, router=threshold_router)
    layer = moe_block(model).layer
    assert isinstance(layer.router, _ThresholdRouter) and torch.equal(layer.router.gate.weight, gate_hf)
    _run_forward_backward(model)
    per_token = layer.last_decision.experts_per_token()
    assert per_token.min() >= 1 and per_token.max() > 1 and per_token.float().std() > 0  # dynamic k
    assert layer.router.gate.weight.grad is not None

    with torch.no_grad():
        layer.router.gate.weight.add_(1.0)
    trained_gate = layer.router.gate.weight.detach().clone()
    unpatch_model(model)
    block = moe_block(model)
    hf_router = block.router if family == "gpt_oss" else block.gate
    assert torch.equal(hf_router.weight, trained_gate)  # the gate goes back
    if bias_hf is not None:  # this router has no bias: gpt-oss's keeps its value
        assert torch.equal(hf_router.bias, bias_hf)
    assert all(not t.is_meta for t in block.state_dict().values())


def test_swapping_to_top_p_runs_and_changes_experts_per_token():
    model = make_model("mixtral").train()
    hf_gates = [layer.mlp.gate.weight.detach().clone() for layer in model.model.layers]
    k_hf = model.config.num_experts_per_tok
    patch_model(model, router="top_p", p=0.05)  # below any top-1 probability: "exceed" keeps exactly one expert
    _run_forward_backward(model)
    layers = _patched_layers(model)
    assert len(layers) == len(hf_gates)
    for layer, gate in zip(layers, hf_gates):
        assert torch.equal(layer.router.gate.weight, gate)  # started from the HF router
        per_token = layer.last_decision.experts_per_token()
        assert torch.all(per_token == 1) and k_hf > 1


def test_unsupported_block_is_a_clear_error():
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.linear\.Linear.*Mixtral.*GPT-OSS"):
        from_hf(torch.nn.Linear(4, 4))
    config = transformers.PhimoeConfig(**COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(TypeError, match="PhimoeSparseMoeBlock.*supported transformers MoE blocks: Mixtral"):
        patch_model(model)


def test_gpt_oss_patched_block_returns_hidden_and_scores():
    model = make_model("gpt_oss")
    x = torch.randn(2, 5, D)
    y_hf, scores_hf = moe_block(model)(x)
    patch_model(model)
    y, weights_TE = moe_block(model)(x)
    torch.testing.assert_close(y, y_hf, atol=1e-5, rtol=0)
    # HF returns the k weights per token; the patched block returns them densely as [T, E].
    top_TK = weights_TE.sort(dim=-1, descending=True).values[:, :2]
    torch.testing.assert_close(top_TK, scores_hf.sort(dim=-1, descending=True).values)


def test_importing_routelab_does_not_import_transformers():
    code = "import sys, routelab, routelab.interop.hf; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("padded", [False, True])
def test_per_slot_aux_loss_equals_transformers_load_balancing_loss(padded):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    block = moe_block(make_model("mixtral"))
    layer = from_hf(block, aux_loss_coef=1.0, aux_loss_form="per_slot")
    x = torch.randn(2, 6, D)
    mask = torch.ones(2, 6, dtype=torch.long)
    if padded:
        mask[1, 4:] = 0
    ctx = routelab.RoutingContext(padding_mask=mask == 0)
    _, decision = layer.forward_with_decision(x, ctx)
    logits = block.gate(x)[0]
    want = load_balancing_loss_func((logits,), 4, 2, mask if padded else None)
    torch.testing.assert_close(decision.aux_losses["aux"], want, atol=1e-6, rtol=0)


def _extra_block(name: str):
    """Blocks of the families whose code transformers generates from a main one, built directly (no whole model)."""
    import importlib

    kw = dict(COMMON, experts_implementation="eager")
    moe = dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    if name == "minimax":
        module, cls, config = "minimax", "MiniMaxSparseMoeBlock", transformers.MiniMaxConfig(
            **kw, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    elif name == "qwen3_vl_moe":
        module, cls = "qwen3_vl_moe", "Qwen3VLMoeTextSparseMoeBlock"
        config = transformers.Qwen3VLMoeTextConfig(**kw, intermediate_size=48, **moe)
    elif name == "qwen3_next":
        module, cls = "qwen3_next", "Qwen3NextSparseMoeBlock"
        config = transformers.Qwen3NextConfig(**kw, intermediate_size=48, shared_expert_intermediate_size=24,
                                              norm_topk_prob=False, **moe)
    elif name == "qwen3_5_moe":
        module, cls = "qwen3_5_moe", "Qwen3_5MoeSparseMoeBlock"
        config = transformers.Qwen3_5MoeTextConfig(**kw, shared_expert_intermediate_size=24, **moe)
    elif name == "glm4_moe":
        module, cls = "glm4_moe", "Glm4MoeMoE"
        config = transformers.Glm4MoeConfig(**kw, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                                            num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1)
    elif name == "deepseek_v3_ungrouped":  # n_group=1 (no group limit), unnormalised weights, scaling 1
        module, cls = "deepseek_v3", "DeepseekV3MoE"
        config = transformers.DeepseekV3Config(**kw, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                                               num_experts_per_tok=3, n_group=1, topk_group=1, n_shared_experts=2,
                                               norm_topk_prob=False, routed_scaling_factor=1.0)
    else:
        raise AssertionError(name)
    torch.manual_seed(3)
    block = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls)(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.5 if p.dim() == 2 and p.shape[0] in (4, 8) and p.shape[1] == D else 0.1)
        for b in block.buffers():
            b.normal_(0.0, 0.2)
    return block


@pytest.mark.parametrize(
    "name", ["minimax", "qwen3_vl_moe", "qwen3_next", "qwen3_5_moe", "glm4_moe", "deepseek_v3_ungrouped"]
)
def test_more_families_block_output_gradients_and_round_trip(name):
    block = _extra_block(name)
    layer = from_hf(block)
    x_h = torch.randn(2, 6, D, requires_grad=True)
    x_r = x_h.detach().clone().requires_grad_(True)
    y_h, y_r = _out(block(x_h)), layer(x_r)
    torch.testing.assert_close(y_r, y_h, atol=1e-5, rtol=0)
    upstream = torch.randn_like(y_h)
    (y_h * upstream).sum().backward()
    (y_r * upstream).sum().backward()
    torch.testing.assert_close(x_r.grad, x_h.grad, atol=1e-5, rtol=0)
    grads = _layer_grads_as_hf(layer, block)
    for pname, p in block.named_parameters():
        torch.testing.assert_close(grads[pname], p.grad, atol=1e-5, rtol=0, msg=lambda m: f"{pname}: {m}")

    want = {k: v.clone() for k, v in block.state_dict().items()}
    with torch.no_grad():
        for t in block.state_dict().values():
            t.zero_()
    to_hf(layer, block)
    for k, v in block.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_patch_model_is_all_or_nothing(monkeypatch):
    import routelab.interop.hf as hf

    model = make_model("qwen2_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="k must be"):
        patch_model(model, k=5)  # more than the 4 experts: the first block fails, nothing changes
    real_from_hf, calls = hf.from_hf, []

    def failing_second(block, **kw):
        calls.append(block)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_from_hf(block, **kw)

    monkeypatch.setattr(hf, "from_hf", failing_second)
    with pytest.raises(RuntimeError, match="boom"):
        patch_model(model)
    assert not any(isinstance(m, PatchedMoEBlock) for m in model.modules())
    after = model.state_dict()
    for k in before:
        assert torch.equal(after[k], before[k]), k


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_each_expert_keeps_its_gate_up_order(family):
    """Expert by expert (no routing involved): routelab's expert e computes transformers' expert e."""
    block = moe_block(make_model(family))
    layer = from_hf(block)
    x = torch.randn(5, D)
    hf = block.experts
    for e in range(hf.num_experts):
        if family == "gpt_oss":
            gated = hf._apply_gate(x @ hf.gate_up_proj[e] + hf.gate_up_proj_bias[e])
            want = gated @ hf.down_proj[e] + hf.down_proj_bias[e]
        else:
            gate, up = torch.nn.functional.linear(x, hf.gate_up_proj[e]).chunk(2, dim=-1)
            want = torch.nn.functional.linear(hf.act_fn(gate) * up, hf.down_proj[e])
        torch.testing.assert_close(layer.experts.expert(x, e), want, atol=1e-6, rtol=0)


def test_top1_with_normalised_weights_asks_for_normalize_none():
    block = moe_block(make_model("mixtral"))
    with pytest.raises(ValueError, match='normalize="none"'):
        from_hf(block, k=1)
    assert from_hf(block, k=1, normalize="none").router.k == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_model_in_bf16_stays_within_rounding(family):
    # routelab computes router logits in fp32 where transformers uses the model dtype: a few bf16 ulps apart.
    model = make_model(family, dtype=torch.bfloat16, experts_implementation=None)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 9))
    with torch.no_grad():
        logits_hf = model(ids).logits
        patch_model(model)
        logits_rl = model(ids).logits
    assert logits_rl.dtype == torch.bfloat16
    torch.testing.assert_close(logits_rl.float(), logits_hf.float(), atol=4e-3, rtol=0)


def test_mixtral_router_jitter_becomes_topk_jitter():
    config = _config("mixtral")
    config.router_jitter_noise = 0.05
    block = transformers.AutoModelForCausalLM.from_config(config).model.layers[0].mlp
    assert from_hf(block).router.jitter == 0.05


def test_to_hf_refuses_a_block_of_another_shape():
    layer = from_hf(moe_block(make_model("qwen3_moe")))  # 4 experts
    config = _config("qwen3_moe")
    config.num_experts = 8
    with pytest.raises(ValueError, match="shape mismatch for Qwen3-MoE block entry 'gate.weight'"):
        to_hf(layer, moe_block(transformers.AutoModelForCausalLM.from_config(config)))
    with pytest.raises(ValueError, match="no 'shared_experts.w_gate_up', which a DeepSeek-V3 block needs"):
        to_hf(layer, moe_block(make_model("deepseek_v3")))
    with pytest.raises(TypeError, match="MoELayer"):
        to_hf(torch.nn.Linear(2, 2), moe_block(make_model("qwen3_moe")))

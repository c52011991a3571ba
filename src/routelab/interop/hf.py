"""Hugging Face transformers sparse MoE blocks ⇄ routelab `MoELayer`s, exactly.

    from_hf(block) -> MoELayer          a layer with the block's weights and a router reproducing its routing
    to_hf(layer, block)                 write the layer's (possibly fine-tuned) weights back into the block
    patch_model(model, router=None, **router_options) -> int    swap every sparse MoE block for a routelab layer
    unpatch_model(model) -> int         put the transformers blocks back, with the trained weights

Supported families (transformers ≥ 5, whose experts are stacked 3-D parameters):

| family      | block class            | routing (`topk` options) and experts                                          |
|-------------|------------------------|-------------------------------------------------------------------------------|
| Mixtral     | MixtralSparseMoeBlock  | softmax, top-k, "selected"                                                    |
| Qwen2-MoE   | Qwen2MoeSparseMoeBlock | softmax, top-k, `norm_topk_prob` → "selected"/"none"; gated shared MLP        |
| Qwen3-MoE   | Qwen3MoeSparseMoeBlock | softmax, top-k, `norm_topk_prob` → "selected"/"none"                          |
| OLMoE       | OlmoeSparseMoeBlock    | softmax, top-k, `norm_topk_prob` → "selected"/"none"                          |
| DeepSeek-V3 | DeepseekV3MoE          | sigmoid; correction bias = `expert_bias` (selection only); groups by top-2    |
|             |                        | sums; `routed_scaling_factor` → `scaling`; shared experts                     |
| GPT-OSS     | GptOssMLP              | router bias; top-k of logits then softmax (= softmax, "selected"); biased     |
|             |                        | clamped-SwiGLU experts (`ClampedSwiGLUExperts`)                               |

Also, as their block code is generated from one of these: MiniMax (as Mixtral), Qwen3-VL-MoE text and Qwen3.5-MoE /
Qwen3-Next (as Qwen3-MoE / Qwen2-MoE), GLM-4-MoE (as DeepSeek-V3); tested at block level.

Weight layouts: transformers stores `gate_up_proj [E, 2F, D]` / `down_proj [E, D, F]` (used as `x @ W.T`); routelab
stores `w_gate_up [E, D, 2F]` / `w_down [E, F, D]`, so conversion transposes. gpt-oss stores `[E, D, 2F]` with gate and
up interleaved (even / odd columns); routelab keeps gate in the first F columns. Conversions are pure copies,
transposes and column permutations, so `to_hf(from_hf(b), b')` restores every entry of `b.state_dict()` bit for bit,
and every entry is accounted for (a missing or unexpected one is an error naming it).

Numerics: in fp32 the routelab layer equals the block to ~1e-6. transformers computes routing probabilities in fp32
even for fp64 models (softmax(dtype=float), DeepSeek-V3's fp32 router), routelab in fp64 for fp64 inputs, so in fp64
the two agree only to fp32 rounding of the routing weights (~1e-7 relative); selections agree.

Aux losses: the HF blocks carry none (the HF model computes its balance loss from recorded router logits), so the
layers built here have `aux_loss_coef=0`. A patched model records each layer's router logits for transformers'
`output_router_logits=True`, so the HF model's own aux loss is computed from the same logits, unchanged.

Router swapping: `from_hf(block, router="top_p", p=0.5)` (or `patch_model(model, router=..., ...)`) builds any
registered router with `create_router` and copies the HF gate weights (and bias, and correction bias) into it where
names and shapes agree (`gate.weight`, `gate.bias`, `expert_bias`); `router=None` with options (e.g. `k=1,
normalize="none"`) overrides the family's exact `topk` options. Mixtral's router jitter is mapped to the `topk`
router's jitter (transformers also jitters the experts' input; both are random and training-only).

Importing this module does not import transformers: blocks are recognised by their class's module and name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from routelab.experts.clamped import ClampedSwiGLUExperts
from routelab.layers.moe import MoELayer
from routelab.routing.registry import create_router

__all__ = ["SUPPORTED_FAMILIES", "PatchedMoEBlock", "from_hf", "patch_model", "to_hf", "unpatch_model"]


@dataclass(frozen=True)
class _Family:
    name: str
    module: str  # the transformers module defining the block class
    block: str  # the block class's name
    router: str  # attribute of the block holding the router
    shared: str | None = None  # attribute of the block holding the shared MLP
    shared_gate: str | None = None  # attribute holding the shared expert's sigmoid gate (Linear(D, 1))
    sigmoid_groups: bool = False  # DeepSeek-V3 routing: sigmoid, correction bias, groups, scaling factor
    clamped: bool = False  # gpt-oss experts: biases, interleaved gate/up, clamped SwiGLU
    returns_scores: bool = False  # the block returns (hidden, router_scores)


_M = "transformers.models."
_FAMILIES = (
    _Family("Mixtral", _M + "mixtral.modeling_mixtral", "MixtralSparseMoeBlock", "gate"),
    _Family("Qwen2-MoE", _M + "qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock", "gate",
            shared="shared_expert", shared_gate="shared_expert_gate"),
    _Family("Qwen3-MoE", _M + "qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock", "gate"),
    _Family("OLMoE", _M + "olmoe.modeling_olmoe", "OlmoeSparseMoeBlock", "gate"),
    _Family("DeepSeek-V3", _M + "deepseek_v3.modeling_deepseek_v3", "DeepseekV3MoE", "gate", shared="shared_experts",
            sigmoid_groups=True),
    _Family("GPT-OSS", _M + "gpt_oss.modeling_gpt_oss", "GptOssMLP", "router", clamped=True, returns_scores=True),
    # Blocks whose code is the same as one above (transformers generates them from it):
    _Family("MiniMax", _M + "minimax.modeling_minimax", "MiniMaxSparseMoeBlock", "gate"),
    _Family("Qwen3-VL-MoE", _M + "qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeTextSparseMoeBlock", "gate"),
    _Family("Qwen3-Next", _M + "qwen3_next.modeling_qwen3_next", "Qwen3NextSparseMoeBlock", "gate",
            shared="shared_expert", shared_gate="shared_expert_gate"),
    _Family("Qwen3.5-MoE", _M + "qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeSparseMoeBlock", "gate",
            shared="shared_expert", shared_gate="shared_expert_gate"),
    _Family("GLM-4-MoE", _M + "glm4_moe.modeling_glm4_moe", "Glm4MoeMoE", "gate", shared="shared_experts",
            sigmoid_groups=True),
)  # fmt: skip
SUPPORTED_FAMILIES = tuple(f"{f.name} ({f.block})" for f in _FAMILIES)


def _family_of(block: nn.Module) -> _Family:
    cls = type(block)
    for family in _FAMILIES:
        if cls.__name__ == family.block and cls.__module__ == family.module:
            return family
    raise TypeError(
        f"routelab.interop.hf does not support {cls.__module__}.{cls.__qualname__}; supported transformers MoE "
        f"blocks: {', '.join(SUPPORTED_FAMILIES)}"
    )


def _looks_like_moe_block(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(getattr(module, "experts", None), nn.Module) and ("moe" in name or "mlp" in name)


# -- weight conversion ----------------------------------------------------------------------------------------------
# Both directions are pure copies, transposes and column permutations: exact in every dtype.


def _mlp_to_routelab(gate_FD: Tensor, up_FD: Tensor, down_DF: Tensor) -> tuple[Tensor, Tensor]:
    """A transformers SwiGLU MLP (nn.Linear weights) → a one-expert bank's (w_gate_up [1, D, 2F], w_down [1, F, D])."""
    return torch.cat([gate_FD.t(), up_FD.t()], dim=1)[None], down_DF.t()[None]


def _hf_to_routelab_state(family: _Family, hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """Block state (names relative to the block) → MoELayer state (names relative to the layer)."""
    r = family.router
    out = {"router.gate.weight": hf[f"{r}.weight"]}
    if family.clamped:
        out["router.gate.bias"] = hf[f"{r}.bias"]
        gu_ED2F, b_E2F = hf["experts.gate_up_proj"], hf["experts.gate_up_proj_bias"]
        out["experts.w_gate_up"] = torch.cat([gu_ED2F[..., 0::2], gu_ED2F[..., 1::2]], dim=-1)
        out["experts.b_gate_up"] = torch.cat([b_E2F[..., 0::2], b_E2F[..., 1::2]], dim=-1)
        out["experts.w_down"] = hf["experts.down_proj"]
        out["experts.b_down"] = hf["experts.down_proj_bias"]
    else:
        out["experts.w_gate_up"] = hf["experts.gate_up_proj"].transpose(1, 2)
        out["experts.w_down"] = hf["experts.down_proj"].transpose(1, 2)
    if f"{r}.e_score_correction_bias" in hf:
        out["router.expert_bias"] = hf[f"{r}.e_score_correction_bias"]
    if family.shared is not None:
        s = family.shared
        mlp = "shared_experts.mlp." if family.shared_gate else "shared_experts."
        out[mlp + "w_gate_up"], out[mlp + "w_down"] = _mlp_to_routelab(
            hf[f"{s}.gate_proj.weight"], hf[f"{s}.up_proj.weight"], hf[f"{s}.down_proj.weight"]
        )
    if family.shared_gate is not None:
        out["shared_experts.gate.weight"] = hf[f"{family.shared_gate}.weight"]
    return out


def _routelab_to_hf_state(family: _Family, rl: dict[str, Tensor]) -> dict[str, Tensor]:
    """MoELayer state → block state, for every entry the layer can provide (router entries may be absent when the
    router was swapped for one without a compatible gate)."""
    out: dict[str, Tensor] = {}
    r = family.router
    for src, dst in (("router.gate.weight", f"{r}.weight"), ("router.expert_bias", f"{r}.e_score_correction_bias")):
        if src in rl:
            out[dst] = rl[src]
    if family.clamped:
        if "router.gate.bias" in rl:
            out[f"{r}.bias"] = rl["router.gate.bias"]
        pairs = (("experts.w_gate_up", "experts.gate_up_proj"), ("experts.b_gate_up", "experts.gate_up_proj_bias"))
        for src, dst in pairs:
            gate, up = rl[src].chunk(2, dim=-1)
            out[dst] = torch.stack([gate, up], dim=-1).flatten(-2)  # interleave: gate at even, up at odd columns
        out["experts.down_proj"] = rl["experts.w_down"]
        out["experts.down_proj_bias"] = rl["experts.b_down"]
    else:
        out["experts.gate_up_proj"] = rl["experts.w_gate_up"].transpose(1, 2)
        out["experts.down_proj"] = rl["experts.w_down"].transpose(1, 2)
    if family.shared is not None:
        s = family.shared
        mlp = "shared_experts.mlp." if family.shared_gate else "shared_experts."
        gate_DF, up_DF = rl[mlp + "w_gate_up"][0].chunk(2, dim=-1)
        out[f"{s}.gate_proj.weight"] = gate_DF.t()
        out[f"{s}.up_proj.weight"] = up_DF.t()
        out[f"{s}.down_proj.weight"] = rl[mlp + "w_down"][0].t()
    if family.shared_gate is not None:
        out[f"{family.shared_gate}.weight"] = rl["shared_experts.gate.weight"]
    return out


# -- routing options per family -------------------------------------------------------------------------------------


def _family_router_options(family: _Family, block: nn.Module) -> dict[str, Any]:
    """`topk` options that reproduce the block's routing exactly."""
    gate = getattr(block, family.router)
    k = int(gate.top_k)
    normalize = "selected" if getattr(gate, "norm_topk_prob", True) else "none"
    options: dict[str, Any] = {"k": k, "normalize": normalize, "aux_loss_coef": 0.0}
    if family.sigmoid_groups:
        options.update(score="sigmoid", scaling=float(gate.routed_scaling_factor), balance="loss_free")
        # transformers never updates e_score_correction_bias itself; pass bias_update_rate to train it loss-free.
        options["bias_update_rate"] = 0.0
        if gate.num_group > 1:
            options.update(n_group=int(gate.num_group), topk_group=int(gate.topk_group), group_score="top2_sum")
    if family.clamped:
        options["router_bias"] = True
    jitter = float(getattr(block, "jitter_noise", 0.0) or 0.0)
    if jitter > 0:
        options["jitter"] = jitter
    return options


def _check_activation(family: _Family, block: nn.Module) -> None:
    if family.clamped:
        return
    owners = [block.experts] + ([getattr(block, family.shared)] if family.shared else [])
    for owner in owners:
        act = getattr(owner, "act_fn", None)
        if type(act).__name__ not in ("SiLU", "SiLUActivation"):
            raise ValueError(
                f"{family.name} block uses activation {type(act).__name__}; routelab's SwiGLU experts reproduce "
                "hidden_act='silu' only"
            )


# -- public API -----------------------------------------------------------------------------------------------------


def from_hf(block: nn.Module, *, router: str | None = None, **router_options: Any) -> MoELayer:
    """A routelab `MoELayer` equal to a transformers sparse MoE block (weights copied, never shared).

    router=None: a `topk` router configured to reproduce the family's routing exactly; `router_options` override
    single options (e.g. `k=4`). router="name": `create_router(name, **router_options)` with the HF gate weights
    copied in where names and shapes agree. The layer is on the block's device, with the block's dtypes (so that
    `to_hf` is bit-exact) and training mode; the router still computes in fp32.
    """
    family = _family_of(block)
    _check_activation(family, block)
    state = _hf_to_routelab_state(family, dict(block.state_dict()))
    state = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in state.items()}
    E, D, F2 = state["experts.w_gate_up"].shape
    F = F2 // 2
    device = state["experts.w_gate_up"].device

    with torch.device(device):
        if router is None:
            options = {**_family_router_options(family, block), **router_options}
            if options["k"] == 1 and options["normalize"] == "selected":
                raise ValueError(
                    f"{family.name} block with top_k=1 and normalised weights: every weight is exactly 1, which the "
                    'topk router rejects (no router gradient); pass normalize="none" to route with the raw '
                    "probability instead"
                )
            router_module = create_router("topk", d_model=D, num_experts=E, **options)
        else:
            router_module = create_router(router, d_model=D, num_experts=E, **router_options)
        experts = None
        if family.clamped:
            experts = ClampedSwiGLUExperts(E, D, F, alpha=float(block.experts.alpha), limit=float(block.experts.limit))
        shared_d_ff = None
        if family.shared is not None:
            shared_d_ff = getattr(block, family.shared).down_proj.weight.shape[1]
        layer = MoELayer(
            D,
            F,
            router_module,
            shared_experts=1 if shared_d_ff else 0,
            shared_d_ff=shared_d_ff,
            shared_expert_gate=family.shared_gate is not None,
            experts=experts,
        )

    router_state = {k: v for k, v in state.items() if k.startswith("router.")}
    body_state = {k: v for k, v in state.items() if not k.startswith("router.")}
    expected_body = {k for k in layer.state_dict() if not k.startswith("router.")}
    if set(body_state) != expected_body:  # a conversion bug, never a user error
        raise RuntimeError(f"conversion mismatch: got {sorted(body_state)}, layer expects {sorted(expected_body)}")
    layer.load_state_dict(body_state, strict=False, assign=True)
    if router is None and not router_options:
        layer.load_state_dict(router_state, strict=False, assign=True)
        missing = {k for k in layer.state_dict() if k.startswith("router.")} - set(router_state)
        if missing:
            raise RuntimeError(f"conversion mismatch: router entries {sorted(missing)} were not filled")
    else:
        _load_matching(layer, router_state)
    layer.train(block.training)
    return layer


def _load_matching(layer: MoELayer, router_state: dict[str, Tensor]) -> None:
    """Copy router entries whose names and shapes the layer's router shares (a swapped router)."""
    own = layer.state_dict()
    matching = {k: v for k, v in router_state.items() if k in own and own[k].shape == v.shape}
    layer.load_state_dict(matching, strict=False, assign=True)


def _writable_state(family: _Family, layer: MoELayer, target: dict[str, Tensor], *, strict: bool) -> dict[str, Tensor]:
    """The block entries (names relative to the block) the layer provides, checked against the block's state."""
    if not isinstance(layer, MoELayer):
        raise TypeError(f"to_hf expects a routelab MoELayer, got {type(layer).__name__}")
    try:
        source = _routelab_to_hf_state(family, dict(layer.state_dict()))
    except KeyError as err:
        raise ValueError(f"the layer has no {err.args[0]!r}, which a {family.name} block needs") from None
    unexpected = sorted(set(source) - set(target))
    if unexpected:
        raise ValueError(f"{family.name} block has no entries {unexpected} (a different configuration?)")
    writable = {}
    for name, value in source.items():
        if value.shape != target[name].shape:
            # A swapped router may score more experts (null experts): its gate cannot go back; experts must.
            if strict or not name.startswith(family.router + "."):
                raise ValueError(
                    f"shape mismatch for {family.name} block entry {name!r}: layer gives {tuple(value.shape)}, "
                    f"block has {tuple(target[name].shape)}"
                )
            continue
        writable[name] = value
    missing = sorted(set(target) - set(writable))
    if strict and missing:
        raise ValueError(
            f"the layer cannot provide {family.name} block entries {missing}; use strict=False to keep them"
        )
    return writable


@torch.no_grad()
def to_hf(layer: MoELayer, block: nn.Module, *, strict: bool = True) -> None:
    """Write a layer's weights into a transformers block of a supported family, in place.

    Every entry of `block.state_dict()` is written; strict=True raises naming any entry the layer cannot provide
    (e.g. the gate of a swapped router of another shape), strict=False leaves those router entries unchanged.
    Unknown entries and other shape mismatches always raise. Values are cast to the block's dtypes (exact when they
    match).
    """
    family = _family_of(block)
    target = block.state_dict()
    for name, value in _writable_state(family, layer, target, strict=strict).items():
        target[name].copy_(value)


class _RouterLogitsTap(nn.Module):
    """Identity on a layer's router logits, so transformers' output recorder can capture them."""

    def forward(self, logits_TE: Tensor) -> Tensor:
        return logits_TE


class PatchedMoEBlock(nn.Module):
    """A routelab `MoELayer` standing in for a transformers sparse MoE block (made by `patch_model`).

    forward(hidden_states [..., D]) returns what the replaced block returned: the output, or for GPT-OSS
    (output, dense routing weights [T, E]) (the decoder layer discards the second). `layer` is the MoELayer; the
    replaced block is kept outside the module tree, on the meta device, for `unpatch_model`.
    """

    def __init__(self, layer: MoELayer, family: _Family, original: nn.Module, leftover: dict[str, Tensor]) -> None:
        super().__init__()
        self.layer = layer
        self.router_logits = _RouterLogitsTap()
        self.family_name = family.name
        # Plain attributes, not submodules: the original's parameters must not appear in model.parameters().
        self.__dict__["_family"] = family
        self.__dict__["_original"] = original
        self.__dict__["_leftover"] = leftover

    def forward(self, hidden_states: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        y, decision = self.layer.forward_with_decision(hidden_states)
        if decision.router_logits is not None:
            self.router_logits(decision.router_logits)
        if self.__dict__["_family"].returns_scores:
            return y, decision.dense_weights()
        return y

    def extra_repr(self) -> str:
        return f"family={self.family_name}"


def _install_router_logits_hook(module: nn.Module) -> None:
    """Let transformers' `output_router_logits=True` record this module's output (its index 0 if a tuple)."""
    try:
        from transformers.utils.output_capturing import install_output_capuring_hook
    except ImportError:  # other transformers versions: router logits are simply not recorded
        return
    install_output_capuring_hook(module, "router_logits", 0)


def _hooks_installed(model: nn.Module) -> bool:
    return any(getattr(m, "_output_capturing_hooks_installed", False) for m in model.modules())


def patch_model(model: nn.Module, router: str | None = None, **router_options: Any) -> int:
    """Replace every supported sparse MoE block of `model` in place by an equivalent `PatchedMoEBlock`.

    router=None keeps each family's exact routing (options override single `topk` options); router="name" builds that
    router per block, initialised from the HF gate weights where shapes allow (see `from_hf`). Returns the number of
    blocks replaced; blocks already patched are left as they are (unpatch first to change their router). Raises,
    naming the supported families, when the model holds MoE-like blocks of an unsupported class. The replaced
    blocks' storage moves to the meta device (memory is not doubled); `unpatch_model` restores them. Save the model
    with `save_pretrained` only after `unpatch_model`.
    """
    found: list[tuple[nn.Module, str, nn.Module]] = []
    unsupported: set[str] = set()
    for parent in model.modules():
        if isinstance(parent, PatchedMoEBlock):
            continue
        for name, child in parent.named_children():
            try:
                _family_of(child)
            except TypeError:
                if _looks_like_moe_block(child) and not isinstance(child, (PatchedMoEBlock, MoELayer)):
                    unsupported.add(f"{type(child).__module__}.{type(child).__qualname__}")
                continue
            found.append((parent, name, child))
    if unsupported:
        raise TypeError(
            f"routelab.interop.hf does not support {', '.join(sorted(unsupported))}; supported transformers MoE "
            f"blocks: {', '.join(SUPPORTED_FAMILIES)}"
        )
    hooked = _hooks_installed(model)
    done: list[tuple[nn.Module, str, PatchedMoEBlock]] = []
    try:
        for parent, name, block in found:
            patched = _patch_block(block, router, router_options, hooks_installed=hooked)
            setattr(parent, name, patched)
            done.append((parent, name, patched))
    except BaseException:  # all or nothing: put back the blocks patched before the failure
        for parent, name, patched in done:
            _restore(parent, name, patched, hooks_installed=False)
        raise
    return len(found)


def _patch_block(
    block: nn.Module, router: str | None, router_options: dict[str, Any], *, hooks_installed: bool
) -> PatchedMoEBlock:
    family = _family_of(block)
    layer = from_hf(block, router=router, **router_options)
    state = block.state_dict()
    written = set(_writable_state(family, layer, state, strict=False))
    leftover = {k: v.detach().clone() for k, v in state.items() if k not in written}
    # Free the block's storage unless it holds state outside its state_dict (non-persistent buffers).
    keep = bool(set(dict(block.named_buffers())) - set(state))
    patched = PatchedMoEBlock(layer, family, block if keep else block.to("meta"), leftover)
    patched.train(block.training)
    _install_router_logits_hook(patched.router_logits)
    patched.__dict__["_hooks_at_patch"] = hooks_installed
    return patched


@torch.no_grad()
def _restore(parent: nn.Module, name: str, patched: PatchedMoEBlock, *, hooks_installed: bool) -> None:
    block, family = patched.__dict__["_original"], patched.__dict__["_family"]
    if any(t.is_meta for t in block.state_dict().values()):
        block.to_empty(device=patched.layer.experts.w_gate_up.device)
    block.load_state_dict(patched.__dict__["_leftover"], strict=False)
    to_hf(patched.layer, block, strict=False)
    if hooks_installed and not patched.__dict__["_hooks_at_patch"]:
        # transformers installed its recorders while the block was patched; give its router one.
        _install_router_logits_hook(getattr(block, family.router))
    block.train(patched.training)
    setattr(parent, name, block)


@torch.no_grad()
def unpatch_model(model: nn.Module) -> int:
    """Put back every block `patch_model` replaced, with the routelab layers' current weights. Returns the count.

    Router entries a swapped router cannot provide (e.g. a correction bias) keep their values from patch time.
    """
    found = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, PatchedMoEBlock)
    ]
    hooked = _hooks_installed(model)
    for parent, name, patched in found:
        _restore(parent, name, patched, hooks_installed=hooked)
    return len(found)

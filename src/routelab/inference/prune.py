"""Expert pruning by routing statistics: keep the n experts per layer that carry the most routing mass.

Papers: expert pruning by router statistics as studied in Not All Experts are Equal (NAEE, Lu et al., 2024; their
main method searches expert subsets by output reconstruction, which routelab does not) and used as the frequency
baseline in MC-SMoE (Merge, Then Compress; Li et al., 2024).

Defining property: the pruned model has exactly `keep` routed experts in every MoE layer, and they are the `keep`
experts with the largest routing frequency × mean weight on the calibration text (= the sum of their routing
weights; ties go to the lower expert id), in their original order; their weights and router rows are copied
unchanged, so a token whose experts were all kept is routed and computed as before (for routers that renormalise
over the selected experts, exactly; otherwise its weights grow, since the softmax loses the pruned experts' share).

Supported routers: `topk` (gate rows, its bias and balancing buffers are cut to the kept experts; not with n_group)
and `cosine` (centroids). A routelab LM's config gets `num_experts=keep`, so `save_model` / `load_model` round-trip
the smaller model. A patched Hugging Face model is pruned in memory; `unpatch_model` cannot write fewer experts back.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from routelab.inference._collect import routing_statistics
from routelab.inference.override import moe_layers
from routelab.layers.moe import MoELayer

__all__ = ["prune_experts"]

_EXPERT_TENSORS = ("w_gate_up", "w_down", "b_gate_up", "b_down")
_ROUTER_BUFFERS = ("expert_bias", "_pending_load", "bip_dual", "_pending_dual")


def check_shrinkable(model: nn.Module, keep: object, what: str) -> list[MoELayer]:
    """The model's MoE layers, after checking that every one can be cut to `keep` experts (errors name `keep`)."""
    from routelab.experts.clamped import ClampedSwiGLUExperts
    from routelab.experts.swiglu import SwiGLUExperts
    from routelab.routing.cosine import CosineRouter
    from routelab.routing.topk import TopKRouter

    layers = moe_layers(model)
    for i, layer in enumerate(layers):
        E, router = layer.router.num_experts, layer.router
        if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep < E:
            raise ValueError(f"keep must be an integer in [1, {E - 1}] (fewer than layer {i}'s {E} experts), got {keep!r}")
        if not (isinstance(router, TopKRouter) and router.n_group is None) and not isinstance(router, CosineRouter):
            raise ValueError(f"{what} supports topk (without n_group) and cosine routers; layer {i} has "
                             f"{type(router).__name__}")
        if keep < router.k:
            raise ValueError(f"keep={keep} is below layer {i}'s router k={router.k}")
        if type(layer.experts) not in (SwiGLUExperts, ClampedSwiGLUExperts):
            raise ValueError(f"{what} supports SwiGLU expert banks; layer {i} has {type(layer.experts).__name__}")
    return layers


@torch.no_grad()
def shrink_layer(layer: MoELayer, keep_K: Tensor, mix_KE: Tensor | None = None) -> None:
    """Cut `layer` to the experts `keep_K` (LongTensor [K], in the order given), in place.

    mix_KE: optional [K, E] row-stochastic weights; the new expert j's tensors are Σ_e mix[j, e] · old expert e's
    (merging). Router rows, biases and balancing buffers are those of keep_K.
    """
    from routelab.routing.cosine import CosineRouter

    router, bank = layer.router, layer.experts
    K = keep_K.numel()
    if isinstance(router, CosineRouter):
        router.centroids = nn.Parameter(router.centroids[keep_K].clone())
    else:
        old = router.gate
        gate = nn.Linear(old.in_features, K, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        gate.weight.copy_(old.weight[keep_K])
        if old.bias is not None:
            gate.bias.copy_(old.bias[keep_K])
        router.gate = gate
        for name in _ROUTER_BUFFERS:
            buf = router._buffers.get(name)
            if buf is not None:
                router._buffers[name] = buf[keep_K].clone()
    router.num_experts = K
    for name in _EXPERT_TENSORS:
        param = getattr(bank, name, None)
        if param is None:
            continue
        if mix_KE is None:
            new = param[keep_K].clone()
        else:
            mix = mix_KE.to(device=param.device, dtype=torch.float64)
            new = torch.einsum("ke,e...->k...", mix, param.double()).to(param.dtype)
        setattr(bank, name, nn.Parameter(new, requires_grad=param.requires_grad))
    bank.num_experts = K


def update_config(model: nn.Module, keep: int) -> None:
    """A routelab LM's config records the new expert count, so that save_model / load_model rebuild it."""
    from routelab.models.transformer import MoETransformerLM

    if isinstance(model, MoETransformerLM):
        model.config = dataclasses.replace(model.config, num_experts=keep)


def prune_experts(
    model: nn.Module, data: Tensor | Iterable[Tensor], *, keep: int, batch_size: int = 16
) -> nn.Module:
    """A copy of `model` with `keep` experts per MoE layer, chosen by routing mass on `data` (token ids
    [N, L] or batches); `model` is left unchanged."""
    check_shrinkable(model, keep, "prune_experts")
    stats = routing_statistics(model, data, batch_size=batch_size)
    pruned = copy.deepcopy(model)
    for layer, s in zip(moe_layers(pruned), stats):
        mass_E = s["weight"]
        order = torch.sort(mass_E, descending=True, stable=True).indices[:keep]
        keep_K = torch.sort(order).values
        shrink_layer(layer, keep_K)
    update_config(pruned, keep)
    return pruned

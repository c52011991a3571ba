"""Expert parallelism for any model with `MoELayer`s: shard routed experts over ranks, exchange rows all-to-all.

    import torch.distributed as dist, routelab.distributed as rd
    dist.init_process_group("gloo")              # torchrun sets the environment
    model = build_model()                        # the same model on every rank (rank 0's weights win)
    rd.expert_parallel(model)                    # rank r keeps experts [r·E/W, (r+1)·E/W)
    loss = model(my_tokens) / world_size         # each rank its own tokens: its share of the global loss
    loss.backward(); rd.all_reduce_replicated_grads(model)   # experts need no reduction: see below

Gradients: an expert's rows come from every rank and its outputs return through the all-to-all, so the backward
all-to-all brings every rank's contribution home — an expert's gradient on its owner is already the whole
group's. Replicated parameters (routers, shared experts, attention, embeddings) only saw this rank's tokens, so
their gradients are summed over the group by `all_reduce_replicated_grads`; expert gradients never are (summing
them too is the doubled-gradient bug).
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import Tensor, nn

from routelab.distributed._collectives import all_gather_rows, collective_device
from routelab.distributed.all_to_all import AllToAllDispatcher
from routelab.layers.moe import MoELayer
from routelab.routing.base import Router


def expert_parallel(model: nn.Module, group=None, *, least_loaded: bool = False, alpha: float = 1.3) -> nn.Module:
    """Shard every `MoELayer` of `model` (in place; returns it) over `group` (None: the default group).

    Rank r keeps routed experts [r·E/W, (r+1)·E/W) (its bank's weights get leading dimension E/W) and an
    `AllToAllDispatcher`; routers, shared experts and everything else stay replicated — broadcast from the
    group's rank 0 first, so every rank starts from the same model. Routers that keep statistics make them global
    over the group (`Router.statistics_group`). Call it before building the optimizer.

    Errors (raised on every rank, never a hang): torch.distributed not initialised; models that differ across
    ranks (a checksum of parameter names and shapes); E not divisible by W; a layer already expert-parallel; the
    ERC loss (it needs every expert's weights in one place).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "expert_parallel needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group (torchrun sets the environment) first"
        )
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
    # The checksum is the first collective, entered by every rank before any check that could differ by rank.
    digest = _digest(model, least_loaded, alpha)
    digest_t = torch.tensor([digest], dtype=torch.long, device=collective_device(group))
    digests = all_gather_rows(digest_t, group)[:, 0].tolist()
    if len(set(digests)) > 1:
        raise ValueError(
            f"expert_parallel: the model differs across ranks (parameter-shape checksums by rank: {digests}); "
            "build the same model, with the same options, on every rank"
        )
    if not layers:
        raise ValueError(f"expert_parallel: {type(model).__name__} has no MoELayer")
    banks_seen: dict[int, str] = {}
    for name, layer in layers:
        E, where = layer.router.num_experts, name or "the model"
        if isinstance(layer.dispatcher, AllToAllDispatcher):
            raise ValueError(f"expert_parallel: the MoELayer at {where} is already expert-parallel")
        if E % world:
            raise ValueError(
                f"expert_parallel: num_experts={E} of the MoELayer at {where} is not divisible by the group size "
                f"{world}; use a group size that divides it"
            )
        if layer.erc_loss_coef > 0:
            raise ValueError(f"expert_parallel: the MoELayer at {where} has erc_loss_coef > 0; ERC is not supported "
                             "under expert parallelism (it needs every expert's weights in one process)")
        if id(layer.experts) in banks_seen:
            raise ValueError(f"expert_parallel: the MoELayers at {banks_seen[id(layer.experts)]} and {where} share one "
                             "expert bank (model.expert_pool: unipool); expert parallelism slices each layer's own bank")
        banks_seen[id(layer.experts)] = where
        for pname, p in layer.experts.named_parameters():
            if "." in pname or p.dim() == 0 or p.shape[0] != E:
                raise ValueError(
                    f"expert_parallel: {type(layer.experts).__name__}.{pname} is not stacked over the {E} experts "
                    "(banks must hold their own parameters with leading dimension num_experts)"
                )
    _broadcast_from_first(model, group)
    for _, layer in layers:
        E = layer.router.num_experts
        per_rank = E // world
        lo = rank * per_rank
        bank = layer.experts
        for pname, p in list(bank._parameters.items()):
            if p is not None:
                bank._parameters[pname] = nn.Parameter(p.detach()[lo : lo + per_rank].clone(), p.requires_grad)
        bank.num_experts = per_rank
        layer.dispatcher = AllToAllDispatcher(E, group=group, least_loaded=least_loaded, alpha=alpha)
    for module in model.modules():
        if isinstance(module, Router):
            module.statistics_group = group if group is not None else dist.group.WORLD
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of expert-parallel banks (sharded: each rank holds its own)."""
    return [
        p
        for m in model.modules()
        if isinstance(m, MoELayer) and isinstance(m.dispatcher, AllToAllDispatcher)
        for p in m.experts.parameters()
    ]


def all_reduce_replicated_grads(model: nn.Module, group=None) -> None:
    """Sum the gradients of every replicated parameter over `group`; expert-parallel banks are left alone.

    With each rank's loss its share of the global loss (e.g. its mean loss / W), this gives every parameter the
    gradient of the global loss. Parameters without a gradient on any rank get zeros first, so every rank
    reduces the same list of tensors.
    """
    sharded = {id(p) for p in expert_parameters(model)}
    grads = []
    for p in model.parameters():
        if id(p) in sharded or not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded state dict (every expert of every bank, gathered from the ranks that hold them), on every
    rank: what one process would save. A collective: every rank of the layers' groups must call it."""
    state = model.state_dict()
    for name, layer in model.named_modules():
        if isinstance(layer, MoELayer) and isinstance(layer.dispatcher, AllToAllDispatcher):
            prefix = f"{name}.experts." if name else "experts."
            for pname, p in layer.experts.named_parameters():
                state[prefix + pname] = all_gather_rows(p.detach(), layer.dispatcher.group).flatten(0, 1)
    return state


def _broadcast_from_first(model: nn.Module, group) -> None:
    src = dist.get_global_rank(group, 0) if group is not None else 0
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=src, group=group)


def _digest(model: nn.Module, least_loaded: bool, alpha: float) -> int:
    """A cheap checksum of the model's structure: names, shapes and dtypes of parameters and buffers, the MoE
    layers' expert counts, and the expert-parallel options."""
    parts = [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in [*model.named_parameters(), *model.named_buffers()]]
    parts += [f"{n}:E={m.router.num_experts}" for n, m in model.named_modules() if isinstance(m, MoELayer)]
    parts.append(f"least_loaded={least_loaded}:alpha={alpha}")
    return zlib.crc32("|".join(parts).encode())

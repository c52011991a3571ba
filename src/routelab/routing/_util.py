"""Small helpers shared by the router families: stable top-k, seeded integers, sequences, and
the softmax-top-k tail (selection, weights, Switch aux loss).

Shape legend: T tokens, E experts, K slots, S assignments.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from routelab.routing.base import RoutingContext
from routelab.routing.losses import switch_balance_loss

_MASK64 = (1 << 64) - 1
# Up to this many scores, top_indices sorts every row (no tie search, no host sync); measured faster below it.
SORT_ALL_MAX_ELEMENTS = 2048


def top_indices(values_TE: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries per row; ties go to the lower index (a stable sort, unlike torch.topk)."""
    # NOTE: torch.topk is 3-4x faster than the full stable sort on CPU (E=64..256) but breaks ties arbitrarily.
    # In a row where no two of the k+1 largest values are equal, the top k and their order are unique, so topk's
    # answer is the stable sort's; only the rows with such a tie are sorted. Looking for ties costs a host sync and
    # a few small kernels, which at decode-size inputs (a few rows) cost more than sorting every row outright.
    if values_TE.numel() <= SORT_ALL_MAX_ELEMENTS:
        return torch.sort(values_TE, dim=-1, descending=True, stable=True).indices[:, :k]
    top = values_TE.topk(min(k + 1, values_TE.shape[-1]), dim=-1)
    index_TK = top.indices[:, :k]
    tied_T = (top.values[:, 1:] == top.values[:, :-1]).any(dim=-1)
    if bool(tied_T.any()):
        index_TK = index_TK.clone()
        index_TK[tied_T] = torch.sort(values_TE[tied_T], dim=-1, descending=True, stable=True).indices[:, :k]
    return index_TK


def mix64(*values: int) -> int:
    """A stable 64-bit mix of integers (splitmix64 steps); the same in every process, unlike Python's hash()."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h


def unit_interval(*values: int) -> float:
    """A number in [0, 1) that is a deterministic function of the integers."""
    return (mix64(*values) >> 11) / float(1 << 53)


def sequence_shape(ctx: RoutingContext | None, num_tokens: int) -> tuple[int, int]:
    """(B, L): the flattened tokens as B sequences of length L, from ctx.batch_shape; a 2-D input is one sequence."""
    shape = None if ctx is None else ctx.batch_shape
    if shape is None or len(shape) <= 1:
        return 1, num_tokens
    L = int(shape[-1])
    B = math.prod(int(s) for s in shape[:-1])
    if B * L != num_tokens:
        raise ValueError(f"RoutingContext.batch_shape={tuple(shape)} does not match {num_tokens} tokens")
    return B, L


def real_mask(ctx: RoutingContext | None, num_tokens: int, device: torch.device) -> Tensor:
    """BoolTensor [T]: True for real (non-padding) tokens."""
    pad_T = None if ctx is None else ctx.flat_padding_mask(num_tokens)
    if pad_T is None:
        return torch.ones(num_tokens, dtype=torch.bool, device=device)
    return ~pad_T.to(device)


def flatten_choices(expert_TK: Tensor, weight_TK: Tensor, keep_TK: Tensor | None = None):
    """COO (token_S, expert_S, weight_S) from per-token slots, keeping slots where keep_TK is True."""
    T, K = expert_TK.shape
    token_TK = torch.arange(T, device=expert_TK.device)[:, None].expand(T, K)
    if keep_TK is None:
        return token_TK.reshape(-1), expert_TK.reshape(-1), weight_TK.reshape(-1)
    return token_TK[keep_TK], expert_TK[keep_TK], weight_TK[keep_TK]


def top_k_choices(probs_TE: Tensor, k: int, real_T: Tensor, *, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """COO (token_S, expert_S, weight_S): each real token's k most probable experts (stable ties, lower index),
    weighted by `probs_TE` at them, renormalised over the k selected when `renormalize`.

    probs_TE [T, E] (selection sees it detached; the weights keep its graph); real_T BoolTensor [T] (padding gets
    no assignment). S = K · (number of real tokens), token-major.
    """
    T = probs_TE.shape[0]
    expert_TK = top_indices(probs_TE.detach(), k)
    weight_TK = probs_TE.gather(1, expert_TK)
    if renormalize:
        weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)
    return flatten_choices(expert_TK, weight_TK, real_T[:, None].expand(T, k))


def switch_aux_losses(
    coef: float, probs_TE: Tensor, expert_S: Tensor, real_T: Tensor, router=None
) -> dict[str, Tensor]:
    """{"aux": coef · Switch balance loss} over the real tokens' probs_TE [T, E] and the load of expert_S [S];
    {} when coef is 0. With `router` given, the load is summed over its statistics group (global f, local P)."""
    if coef <= 0:
        return {}
    load_E = torch.bincount(expert_S, minlength=probs_TE.shape[-1])
    if router is not None:
        load_E = router.sum_over_group(load_E)
    return {"aux": coef * switch_balance_loss(probs_TE[real_T], load_E)}


def token_timesteps(ctx: RoutingContext | None, num_tokens: int, device: torch.device, *, router: str) -> Tensor:
    """FloatTensor [T] (fp64): each token's diffusion time in [0, 1], from ctx.timestep (one per sequence of
    ctx.batch_shape, or one for all). Raises a ValueError naming `router` when the context carries none."""
    if ctx is None or ctx.timestep is None:
        raise ValueError(
            f"{router} routing needs RoutingContext.timestep (the diffusion time per sequence, in [0, 1]); none was "
            "given: use it in a diffusion model (routelab.models.diffusion_lm, the diffusion demo's DiT)"
        )
    B, L = sequence_shape(ctx, num_tokens)
    t = torch.as_tensor(ctx.timestep, dtype=torch.float64).reshape(-1).to(device)
    if t.numel() == 1:
        t = t.expand(B)
    if t.numel() != B:
        raise ValueError(f"RoutingContext.timestep has {t.numel()} values for {B} sequences")
    if not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError("RoutingContext.timestep must lie in [0, 1]")
    return t.repeat_interleave(L)

"""Differentiable collectives for expert parallelism, and the rule that keeps their backward from hanging.

A collective in backward must be entered by every rank of the group, in the same order. Autograd runs a node only
when it is part of the graph and reached from the loss; a rank with no rows (zero tokens, or no rows for its
experts) would otherwise build a different graph than its peers and skip the collective they wait in. So:
every call records a node whenever grad mode is on (an anchor leaf makes the output require grad even when the
input does not), and `touch` joins every exchanged tensor to the layer output, so each node is reached on every
rank as long as each rank's loss depends on the layer output.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _AllToAll(torch.autograd.Function):
    """Rows split by `send_splits` go to the ranks in order; rows from each rank arrive by `recv_splits`.
    Backward sends the gradients back the same way (splits swapped)."""

    @staticmethod
    def forward(ctx, x: Tensor, anchor: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _exchange(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        dx = _exchange(grad.contiguous(), ctx.recv_splits, ctx.send_splits, ctx.group)
        return dx, None, None, None, None


def _exchange(x: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


def all_to_all(x: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
    """Uneven all-to-all of rows (dim 0), differentiable; every rank must call it with matching splits."""
    if not torch.is_grad_enabled():
        return _exchange(x, send_splits, recv_splits, group)
    anchor = torch.zeros((), dtype=x.dtype, requires_grad=True)
    return _AllToAll.apply(x, anchor, send_splits, recv_splits, group)


def touch(y: Tensor, *exchanged: Tensor) -> Tensor:
    """y, made to depend (with zero weight, at no cost in value) on every exchanged tensor, so that their backward
    collectives run on every rank (see the module docstring)."""
    if not torch.is_grad_enabled():
        return y
    zero = sum(t.narrow(0, 0, 0).sum() for t in exchanged if t.requires_grad)
    return y if isinstance(zero, int) else y + zero.to(y.dtype)


def all_gather_rows(x: Tensor, group) -> Tensor:
    """[W, *x.shape]: x from every rank, in rank order (not differentiable)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def collective_device(group) -> torch.device:
    """Where small bookkeeping tensors must live for `group`'s backend: the current CUDA device for nccl."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

"""The training loop's distributed setup: data parallel for replicated parameters, expert parallel for experts.

Launched by torchrun (WORLD_SIZE > 1 in the environment) or inside an initialised process group, the loop calls:

    run = setup()                                  # None in one process: everything as before
    optimizer = run.shard(model, optimizer, make)  # expert_parallel; optimizer state re-sliced (resume on any N)
    inputs, targets = run.rank_batch(inputs, targets)   # rows [r·B/W, (r+1)·B/W) of the global batch
    (loss / W).backward(); run.sync_grads(model)   # replicated grads summed; experts already global
    run.clip_grad_norm(model, max_norm)            # the global norm, as one process would compute it
    run.full_state(model, optimizer)               # consolidated checkpoints (every rank calls; rank 0 writes)

The global batch of step s is the one-process batch (a function of seed and step); rank r takes its rows. Each
rank's loss is the mean over its B/W rows plus its aux losses (load fractions global, router.statistics_group), so
Σ_r loss_r / W is the one-process loss and its gradient the one-process gradient. Router statistics are global.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn


def launched() -> bool:
    """True under torchrun with more than one process, or inside an initialised process group of size > 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Initialise the default process group from torchrun's environment (gloo on CPU, nccl with CUDA)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def is_main() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@dataclass(frozen=True)
class DistributedRun:
    world_size: int
    rank: int

    def shard(self, model: nn.Module, optimizer: torch.optim.Optimizer,
              make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> torch.optim.Optimizer:
        """Make `model` expert-parallel and return a new optimizer over its parameters, carrying `optimizer`'s state
        (a resumed full checkpoint's moments) sliced to this rank's experts."""
        from routelab.distributed import expert_parallel

        before = {name: p.shape for name, p in model.named_parameters()}
        state = optimizer.state_dict()
        order = _param_order(optimizer, model)
        expert_parallel(model)
        new = make_optimizer(model)
        after = dict(model.named_parameters())
        if _param_order(new, model) != order:
            raise RuntimeError("the optimizer's parameter order changed under expert_parallel")
        for index, param_state in state["state"].items():
            name = order[index]
            full, mine = before[name], after[name].shape
            if full != mine:  # an expert bank: keep this rank's block of experts
                lo = self.rank * mine[0]
                param_state = {k: (v[lo : lo + mine[0]].clone() if torch.is_tensor(v) and v.shape == full else v)
                               for k, v in param_state.items()}
            state["state"][index] = param_state
        new.load_state_dict(state)
        return new

    def rank_batch(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        B = inputs.shape[0]
        if B % self.world_size:
            raise ValueError(f"train.batch_size={B} must be divisible by the number of processes {self.world_size}")
        n = B // self.world_size
        return inputs[self.rank * n : (self.rank + 1) * n], targets[self.rank * n : (self.rank + 1) * n]

    def mean(self, value: Tensor) -> Tensor:
        """The mean of a scalar over the ranks (for logging the global loss)."""
        out = value.detach().clone().reshape(1).double()
        dist.all_reduce(out)
        return out[0] / self.world_size

    def sync_grads(self, model: nn.Module) -> None:
        from routelab.distributed import all_reduce_replicated_grads

        all_reduce_replicated_grads(model)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> Tensor:
        """torch.nn.utils.clip_grad_norm_ with the norm of the whole (unsharded) gradient: replicated gradients
        (equal on every rank after sync_grads) once, each rank's expert gradients added over the ranks."""
        from routelab.distributed import expert_parameters

        sharded = {id(p) for p in expert_parameters(model)}
        with_grad = [p for p in model.parameters() if p.grad is not None]
        from routelab.distributed._collectives import collective_device

        expert_sq = torch.zeros(1, dtype=torch.float64, device=collective_device(None))
        for p in with_grad:
            if id(p) in sharded:
                expert_sq += p.grad.double().pow(2).sum()
        dist.all_reduce(expert_sq)  # Σ over ranks of the expert gradients' squares
        replicated_sq = sum(p.grad.double().pow(2).sum() for p in with_grad if id(p) not in sharded)
        total = (expert_sq[0].cpu() + torch.as_tensor(replicated_sq, dtype=torch.float64).cpu()).sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in with_grad:
            p.grad.mul_(coef.to(p.grad.dtype))
        return total

    def consolidated(self, model: nn.Module, empty: nn.Module) -> nn.Module:
        """`empty` (an unsharded model of the same configuration) loaded with `model`'s full state. A collective."""
        from routelab.distributed import full_state_dict

        empty.load_state_dict(full_state_dict(model))
        empty.train(model.training)
        return empty

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """(model state, optimizer state) as one process would have them: experts and their moments gathered.
        A collective: every rank calls it."""
        from routelab.distributed import full_state_dict
        from routelab.distributed._collectives import all_gather_rows

        model_state = full_state_dict(model)
        sharded = {id(p) for p in _expert_params(model)}
        state = optimizer.state_dict()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, param_state in state["state"].items():
            p = params[index]
            if id(p) in sharded:
                state["state"][index] = {
                    k: (all_gather_rows(v, None).flatten(0, 1) if torch.is_tensor(v) and v.shape == p.shape else v)
                    for k, v in param_state.items()
                }
        return model_state, state


def setup() -> DistributedRun | None:
    """The run's distributed context, or None when this is one process (nothing changes then)."""
    if not launched():
        return None
    init()
    return DistributedRun(dist.get_world_size(), dist.get_rank())


def _expert_params(model: nn.Module) -> list[nn.Parameter]:
    from routelab.distributed import expert_parameters

    return expert_parameters(model)


def _param_order(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]

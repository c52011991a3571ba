"""Expert parallelism on torch.distributed (gloo on CPU, nccl on GPU), with least-loaded balancing.

Importing this package does not initialise anything; `expert_parallel(model)` needs an initialised process group.
"""

from routelab.distributed.all_to_all import AllToAllDispatcher, AllToAllPlan
from routelab.distributed.expert_parallel import (
    all_reduce_replicated_grads,
    expert_parallel,
    expert_parameters,
    full_state_dict,
)
from routelab.distributed.least_loaded import Move, plan_least_loaded

__all__ = [
    "AllToAllDispatcher",
    "AllToAllPlan",
    "Move",
    "all_reduce_replicated_grads",
    "expert_parallel",
    "expert_parameters",
    "full_state_dict",
    "plan_least_loaded",
]

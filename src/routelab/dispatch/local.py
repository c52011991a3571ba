"""The local dispatcher: all experts in this process; sort-based permute and combine, or the fused SwiGLU kernel.

Shape legend: T tokens, D model width, F expert width, E experts, S assignments.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from routelab.dispatch.base import Dispatcher
from routelab.dispatch.gathered_swiglu import gathered_swiglu
from routelab.dispatch.grouped_swiglu import grouped_mm_available, grouped_swiglu
from routelab.dispatch.permute import DispatchPlan, combine, make_plan
from routelab.dispatch.routed_swiglu import routed_swiglu
from routelab.routing.base import RoutingDecision

# The tiny-S inference path serves decoding (S = batch·k assignments) and never a training-size batch or large
# experts: at most this many assignments, and at most this many expert-weight elements gathered (16 MiB in fp32).
# It agrees with the sort-based kernel to rounding, not bit for bit (tests/test_gathered_swiglu.py).
DECODE_MAX_ASSIGNMENTS = 64
DECODE_MAX_GATHERED = 1 << 22
# Inference forwards with at most this many assignments per expert on average (fp32, where torch has a grouped
# matmul) take `dispatch/grouped_swiglu.py`: no per-expert loop, no host sync. Above it the loop of
# `routed_swiglu` wins (measured at E=64 and 128, k=8, d=512: the crossover lies between 8 and 16 rows per expert).
GROUPED_MAX_ROWS_PER_EXPERT = 12
# ... except the tiniest calls, which gather their experts' weights (`gathered_swiglu`) even where the grouped matmul
# is there: at most this many weight elements gathered (1 MiB in fp32), fewer than the grouped kernel's per-group
# overhead costs (its C++ loop visits every expert group, empty ones too). Measured with benchmarks/decode.py's model
# (d=64, d_ff=128, E=8, k=2): batch 1 (6·10^4 elements) decodes at 0.53× dense gathered against 0.48× grouped;
# batch 8 (4·10^5) at 0.45× against 0.52×.
GATHER_FIRST_MAX_ELEMENTS = 1 << 18
# With more than one intra-op thread, calls through the loop kernel with at least this much work (the multiply-adds
# plus the expert-weight elements read: (S + touched experts)·3·D·F, touched ≤ min(E, S)) give each thread whole
# experts (`dispatch/workers.py`); below it a thread's share is too small to pay for handing it over (a training
# step of the default compare model is ~2.5·10^7 per layer, one of its decode steps ~10^5).
SPLIT_MIN_WORK = 1 << 22
# ... and only while the experts are fine-grained: at most this many rows per expert on average. Above it one
# expert's matmuls are large enough to share two threads well, and the split's extra output buffers and uneven runs
# cost more than it saves (measured at 2 threads, T=4096, d=512: E=8 and 32 with 1024–4096 rows per expert gained
# nothing or lost up to 0.1× dense; E=64 with 512 gained 0.07×, E=128 0.2×, E=256 0.4×).
SPLIT_MAX_ROWS_PER_EXPERT = 512


class LocalDispatcher(Dispatcher):
    """Every expert is in this process (the default of `MoELayer`).

    dispatch: sort the assignments by expert (stable) and gather their rows; combine: weighted scatter-add.
    Fast path: a bank whose `swiglu_weights()` gives its weights (plain SwiGLU experts) runs through
    `dispatch/routed_swiglu.py`, which gathers, computes and combines one expert group at a time without ever
    holding an [S, D] tensor (benchmarks/layer.py measures it). Inference forwards in fp32 with few rows per
    expert (decoding, small batches: at most `GROUPED_MAX_ROWS_PER_EXPERT` on average) take
    `dispatch/grouped_swiglu.py` — two grouped matmuls, no per-expert loop, no host sync — where torch has a grouped
    matmul; elsewhere forwards with a few assignments (S = batch·k) take `dispatch/gathered_swiglu.py` — no sort,
    no per-expert loop, no host sync — while the assignments stay under `DECODE_MAX_ASSIGNMENTS` and the expert
    weights they gather under `DECODE_MAX_GATHERED` elements (benchmarks/decode.py, benchmarks/layer.py measure
    them).

    With more than one intra-op thread, large calls through the loop kernel give each thread whole experts rather
    than splitting every small per-expert matmul across threads (`workers`; benchmarks/layer.py --threads 1,2).

    decode_fast_path: False sends those forwards through the sort-based loop kernel too.
    """

    def __init__(self, *, decode_fast_path: bool = True) -> None:
        if not isinstance(decode_fast_path, bool):
            raise ValueError(f"decode_fast_path must be one of True, False; got {decode_fast_path!r}")
        self.decode_fast_path = decode_fast_path

    def dispatch(self, x_TD: Tensor, decision: RoutingDecision) -> tuple[Tensor, Tensor, DispatchPlan]:
        plan = make_plan(decision)
        return x_TD.index_select(0, plan.token_S), plan.group_sizes_E, plan

    def combine(self, out_SD: Tensor, plan: DispatchPlan) -> Tensor:
        return combine(out_SD, plan)

    def can_fuse(self, experts: nn.Module) -> bool:
        return experts.swiglu_weights() is not None

    def takes_grouped_path(self, num_assignments: int, num_experts: int, *tensors: Tensor) -> bool:
        """Whether the grouped-matmul kernel (`grouped_swiglu`) can run a forward: inference, fp32 `tensors`, few rows
        per expert, a torch with a grouped matmul. `fused` takes it unless `gathers_first`, before
        `takes_decode_path`; a bank that fetches its weights (offloading) makes the same choice."""
        return (self.decode_fast_path and not torch.is_grad_enabled()
                and num_assignments <= GROUPED_MAX_ROWS_PER_EXPERT * num_experts and _grouped_ok(*tensors))

    def gathers_first(self, num_assignments: int, d_model: int, d_ff: int) -> bool:
        """Whether `fused` sends a forward to the tiny-S kernel before considering the grouped one (a bank that
        fetches its weights makes the same choice): a decode-path call gathering at most
        `GATHER_FIRST_MAX_ELEMENTS` weight elements."""
        small = num_assignments * d_model * 3 * d_ff <= GATHER_FIRST_MAX_ELEMENTS
        return small and self.takes_decode_path(num_assignments, d_model, d_ff)

    def takes_decode_path(self, num_assignments: int, d_model: int, d_ff: int) -> bool:
        """Whether `fused` runs a forward of this many assignments through the tiny-S kernel (`gathered_swiglu`)
        rather than the sort-based one; a bank that fetches its weights (offloading) makes the same choice, so that
        its outputs stay bit-identical to the resident bank's."""
        gathered = num_assignments * d_model * 3 * d_ff  # weight elements the tiny-S path would copy
        few = num_assignments <= DECODE_MAX_ASSIGNMENTS and gathered <= DECODE_MAX_GATHERED
        return self.decode_fast_path and few and not torch.is_grad_enabled()

    def fused(self, x_TD: Tensor, decision: RoutingDecision, experts: nn.Module) -> Tensor:
        w_gate_up_ED2F, w_down_EFD = experts.swiglu_weights()
        device = x_TD.device.type
        if torch.is_autocast_enabled(device):
            # As autocast runs a matmul: inputs and weights in its dtype (the casts carry gradients back to the
            # parameters' dtype). Inside, autocast is off, so every op of the kernels sees one dtype (with it on,
            # some matmuls came out in bf16 and the fp32 accumulation refused them).
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                return self._fused(x_TD.to(dtype), decision, w_gate_up_ED2F.to(dtype), w_down_EFD.to(dtype))
        return self._fused(x_TD, decision, w_gate_up_ED2F, w_down_EFD)

    def _fused(self, x_TD: Tensor, decision: RoutingDecision, w_gate_up_ED2F: Tensor, w_down_EFD: Tensor) -> Tensor:
        E, D, F2 = w_gate_up_ED2F.shape
        grouped = self.takes_grouped_path(decision.num_assignments, E, x_TD, w_gate_up_ED2F, w_down_EFD)
        if grouped and not self.gathers_first(decision.num_assignments, D, F2 // 2):
            plan = make_plan(decision)
            return grouped_swiglu(x_TD, plan.token_S, plan.weight_S, plan.group_sizes_E, w_gate_up_ED2F, w_down_EFD)
        if self.takes_decode_path(decision.num_assignments, D, F2 // 2):
            return gathered_swiglu(x_TD, decision.token_index, decision.expert_index, decision.weight, w_gate_up_ED2F,
                                   w_down_EFD)
        plan = make_plan(decision)
        return routed_swiglu(
            x_TD, plan.token_S, plan.weight_S, plan.group_sizes_E.tolist(), w_gate_up_ED2F, w_down_EFD,
            workers=self.workers(decision.num_assignments, E, D, F2 // 2, x_TD.device),
        )

    def workers(self, num_assignments: int, num_experts: int, d_model: int, d_ff: int, device: torch.device) -> int:
        """Threads that each own whole experts in the loop kernel: on the CPU, the intra-op thread count for calls of
        at least `SPLIT_MIN_WORK` with at most `SPLIT_MAX_ROWS_PER_EXPERT` rows per expert on average, else 1.
        (Autocast, whose state is per thread, is off inside the kernels.)"""
        threads = torch.get_num_threads()
        work = (num_assignments + min(num_experts, num_assignments)) * 3 * d_model * d_ff
        coarse = num_assignments > SPLIT_MAX_ROWS_PER_EXPERT * num_experts
        if threads == 1 or work < SPLIT_MIN_WORK or coarse or device.type != "cpu":
            return 1
        return threads


def _grouped_ok(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.float32 for t in tensors) and grouped_mm_available(tensors[0].device.type)

"""The dispatcher seam: a layer runs any dispatcher and any bank; banks see rows and counts only and are asked only
for the experts that have rows; the local dispatcher's fused and generic paths give one result."""

import torch

import routelab
from reference import reference_moe, reference_topk
from routelab.dispatch import Dispatcher, LocalDispatcher


class RecordingBank(routelab.SwiGLUExperts):
    """A SwiGLU bank on the generic path that records which experts it was asked for (as a bank that loads
    experts from disk on demand would)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.fused = False
        self.asked: list[list[int]] = []

    def active_experts(self, experts):
        self.asked.append(list(experts))
        return super().active_experts(experts)


def test_bank_is_asked_only_for_experts_with_rows_and_matches_the_reference():
    torch.manual_seed(0)
    D, F, E, T = 6, 5, 8, 3
    router = routelab.create_router("topk", d_model=D, num_experts=E, k=2, aux_loss_coef=0.0)
    layer = routelab.MoELayer(D, F, router, experts=RecordingBank(E, D, F)).double()
    x = torch.randn(T, D, dtype=torch.float64)
    y = layer(x)
    used = sorted(set(layer.last_decision.expert_index.tolist()))
    assert layer.experts.asked == [used] and len(used) < E
    ref = reference_moe(x, reference_topk(x, router.gate.weight, k=2, normalize="selected"),
                        layer.experts.w_gate_up, layer.experts.w_down)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


class SpyDispatcher(Dispatcher):
    """A local dispatcher that records what the bank received, to check the seam's contract."""

    def __init__(self):
        self.inner, self.seen = LocalDispatcher(), {}

    def dispatch(self, x_TD, decision):
        rows, counts, plan = self.inner.dispatch(x_TD, decision)
        self.seen.update(rows=rows.shape, counts=counts.tolist())
        return rows, counts, plan

    def combine(self, out_SD, plan):
        return self.inner.combine(out_SD, plan)


def test_a_custom_dispatcher_replaces_the_fused_path_and_agrees_with_it():
    torch.manual_seed(1)
    router = routelab.create_router("topk", d_model=8, num_experts=4, k=2)
    fused = routelab.MoELayer(8, 6, router).double()
    spy = SpyDispatcher()
    generic = routelab.MoELayer(8, 6, router, experts=fused.experts, dispatcher=spy)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(generic(x), fused(x), rtol=1e-12, atol=1e-12)
    assert spy.seen["rows"] == (2 * 5 * 2, 8) and sum(spy.seen["counts"]) == 20 and len(spy.seen["counts"]) == 4

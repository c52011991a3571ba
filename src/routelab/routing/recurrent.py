"""Layerwise recurrent routing: a GRU carried over depth feeds each layer's router.

Paper: Layerwise Recurrent Router for Mixture-of-Experts (RMoE; Qiu et al., ICLR 2025).

Defining property: token t's routing at MoE layer l depends only on t's hidden states at MoE layers ≤ l (through
the recurrent state), and one cell — the same parameter objects — serves every layer of a model.

Algorithm (authors' code; fp32):
    r_l = cell(W1^(l) h_l, r_{l-1})     # W1: Linear(d, hidden); r_0 = 0 before the first MoE layer
    z_l = W2^(l) r_l                     # W2: Linear(hidden, E); softmax, top-k, "selected" (k = 1: "none")
The cell is a standard GRUCell (cell="gru") or tanh RNNCell (cell="rnn") of width `hidden`, shared by all layers:
a model calls `RecurrentRouter.shared_modules(...)` once and passes the returned {"cell": module} to every layer's
router as the option `cell`. State arrives in `ctx.state` ([T, hidden], or None for the first layer) and leaves in
`RoutingDecision.state` with its graph (gradients flow through r across layers); the module keeps none. The
recurrence skips dense layers.

Options (keyword-only) and defaults: hidden=256, cell="gru" | "rnn" | a shared GRUCell/RNNCell module, k=2,
aux_loss_coef=1e-3 (authors' code, E = 8).

Follows the authors' code: the GRU over depth, per-layer W1 and W2, the widths, the top-k form and the aux
coefficient. Our decision: how the shared cell and the state travel (explicit, through the context and decision).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._checks import check_int, check_number
from routelab.routing._util import real_mask, switch_aux_losses, top_k_choices
from routelab.routing.base import Router, RoutingContext, RoutingDecision, router_dtype
from routelab.routing.registry import register_router

CELLS = ("gru", "rnn")


def _make_cell(kind: str, hidden: int) -> nn.Module:
    return nn.GRUCell(hidden, hidden) if kind == "gru" else nn.RNNCell(hidden, hidden, nonlinearity="tanh")


@register_router("recurrent")
class RecurrentRouter(Router):
    """Per-layer W1 → shared recurrent cell over depth → per-layer W2 → softmax top-k."""

    causal = True
    hands_on_state = True

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        hidden: int = 256,
        cell: str | nn.Module = "gru",
        k: int = 2,
        aux_loss_coef: float = 1e-3,
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        check_int("hidden", hidden, 1)
        check_int("k", k, 1, num_experts)
        check_number("aux_loss_coef", aux_loss_coef, low=0)
        if isinstance(cell, str):
            if cell not in CELLS:
                raise ValueError(f"cell must be one of 'gru', 'rnn' or a shared GRUCell/RNNCell module; got {cell!r}")
            cell = _make_cell(cell, hidden)
        elif not isinstance(cell, (nn.GRUCell, nn.RNNCell)):
            raise ValueError(f"cell must be one of 'gru', 'rnn' or a shared GRUCell/RNNCell module; got {cell!r}")
        if cell.input_size != hidden or cell.hidden_size != hidden or not cell.bias:
            raise ValueError(
                f"cell must have input_size = hidden_size = hidden = {hidden} and biases, got "
                f"{cell.input_size}, {cell.hidden_size}, bias={cell.bias}"
            )
        if isinstance(cell, nn.RNNCell) and cell.nonlinearity != "tanh":
            raise ValueError("cell: a shared RNNCell must use nonlinearity='tanh'")
        self.hidden, self.k, self.aux_loss_coef = hidden, k, float(aux_loss_coef)
        self.normalize = "selected" if k > 1 else "none"
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.cell = cell
        self.w2 = nn.Linear(hidden, num_experts, bias=False)

    @classmethod
    def shared_modules(cls, *, d_model: int, num_experts: int, **options: Any) -> dict[str, nn.Module]:
        """{"cell": the recurrent cell} to pass as `cell=` to every layer's router of one model."""
        hidden = options.get("hidden", 256)
        kind = options.get("cell", "gru")
        check_int("hidden", hidden, 1)
        if isinstance(kind, nn.Module):
            return {"cell": kind}
        if kind not in CELLS:
            raise ValueError(f"cell must be one of 'gru', 'rnn'; got {kind!r}")
        return {"cell": _make_cell(kind, hidden)}

    def step(self, x_TD: Tensor, state_TH: Tensor | None) -> Tensor:
        """r_l [T, hidden] from this layer's input and the previous MoE layer's state."""
        dtype = router_dtype(x_TD)
        inp_TH = F.linear(x_TD.to(dtype), self.w1.weight.to(dtype))
        if state_TH is None:
            state_TH = inp_TH.new_zeros(inp_TH.shape)
        elif state_TH.shape != inp_TH.shape:
            raise ValueError(
                f"RoutingContext.state must be [T, hidden] = {tuple(inp_TH.shape)}, got {tuple(state_TH.shape)}"
            )
        c = self.cell
        weights = [w.to(dtype) for w in (c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh)]
        state_TH = state_TH.to(dtype)
        if isinstance(c, nn.GRUCell):
            return torch.gru_cell(inp_TH, state_TH, *weights)
        return torch.rnn_tanh_cell(inp_TH, state_TH, *weights)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        T, E, k = x_TD.shape[0], self.num_experts, self.k
        state_TH = self.step(x_TD, None if ctx is None else ctx.state)
        logits_TE = F.linear(state_TH, self.w2.weight.to(state_TH.dtype))
        probs_TE = logits_TE.softmax(-1)
        real_T = real_mask(ctx, T, x_TD.device)
        token_S, expert_S, weight_S = top_k_choices(probs_TE, k, real_T, renormalize=self.normalize == "selected")
        aux_losses = switch_aux_losses(self.aux_loss_coef, probs_TE, expert_S, real_T, self)
        return RoutingDecision(
            token_index=token_S,
            expert_index=expert_S,
            weight=weight_S,
            num_tokens=T,
            num_experts=E,
            aux_losses=aux_losses,
            router_logits=logits_TE,
            state=state_TH,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden={self.hidden}, k={self.k}"

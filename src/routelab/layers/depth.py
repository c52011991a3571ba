"""Mixture-of-Depths: a router per routed block decides which tokens the whole block processes at all.

Paper: Raposo et al., "Mixture-of-Depths: Dynamically allocating compute in transformer-based language models"
(2024).

Defining property: a routed block has a static compute budget, the capacity C = ⌈capacity · L⌉ tokens per sequence
of length L. A scalar linear router scores every token, r = w·x, and in training exactly the C tokens of highest r
in each sequence run the block (attention and feed-forward, MoE or dense); the other L − C tokens ride the residual
unchanged. The selected tokens run as a shorter causal sequence (in position order, at their original rotary
positions), so the block's attention and FFN FLOPs shrink by C / L. A selected token's block update is multiplied by
its router weight, x + g(r) · (block(x) − x), which puts the router on the gradient path.

Top-C within a sequence is not causal (whether token t is in the top C depends on later tokens), so, as the paper
does, a small causal predictor decides at inference: an MLP on the same block input, with stop-gradient, trained
with binary cross-entropy to predict membership of the training top-C; its loss is added to the training loss
(`last_aux_losses`, summed by `layers.moe.total_aux_loss`). Its gradient reaches only the predictor.

Reconstruction and decisions:
- g is the sigmoid of r (the paper writes r · f(x) for the raw scalar; a sigmoid keeps the weight in (0, 1) and
  near 1/2 at initialisation, so routed blocks contribute from the first step; selection by r and by g(r) is the
  same since g is monotone).
- training-mode forwards select top-C; eval-mode forwards (evaluation, `models.decoding.generate`) select with the
  predictor (a token runs the block when the predictor's logit is > 0), so an eval loss measures what generation
  does. The predictor's choice is per token, so eval forwards process a variable number of tokens per sequence;
  they run the block over all rows with the skipped ones hidden (no attention key, not routed by an MoE layer,
  update discarded) rather than gathering them, and the compute accounting counts the processed tokens.
- routed blocks are every `mod_every`-th block (the last of each group, as MoE layers; the paper routes every other
  block); ties in r are broken by `torch.topk`.
- neither the router nor the predictor is counted in the FLOPs columns (D and D·D/4 + D/4 multiply-adds per token,
  like the MoE routers, which are not counted either).

Shape legend: B sequences, L tokens per sequence, C tokens a routed block processes per sequence, D model width.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._checks import check_number


def capacity_tokens(capacity: float, seq_len: int) -> int:
    """C = ⌈capacity · L⌉ (≥ 1); the product is rounded to 9 decimals first so that e.g. 0.1 · 30 gives 3, not 4."""
    return max(1, math.ceil(round(capacity * seq_len, 9)))


class MixtureOfDepths(nn.Module):
    """The token selection of one routed block: `forward(x_BLD, run, real_BL=None) -> x_BLD` with the block's
    weighted update added on the tokens it processes. real_BL (decoding only): False on padding slots, which never
    run the block; None: x holds whole sequences.

    `run(x_BND, index_BC, run_BL)` is the plain block (returns its output, input included) on rows of x:
      training (top-C): run(x gathered [B, C, D], index_BC = their positions in order, None): a shorter causal
          sequence at the original positions;
      eval (predictor): run(x_BLD, None, run_BL): all rows; the block must hide the rows where run_BL is False
          (no attention key, not routed), whose output is discarded here.
    After a forward: `last_processed` / `last_tokens` count the (real) tokens that ran the block / were seen,
    `last_agreement` the tokens on which the predictor agrees with top-C membership (None in decoding, where top-C
    over a sequence is not defined), and `last_aux_losses` holds the predictor's BCE loss, weight 1 (training only;
    empty otherwise).
    """

    def __init__(self, d_model: int, *, capacity: float) -> None:
        super().__init__()
        check_number("capacity", capacity, low=0, high=1, open_low=True)
        self.capacity = float(capacity)
        self.router = nn.Linear(d_model, 1, bias=False)
        hidden = max(1, d_model // 4)
        self.predictor = nn.Sequential(nn.Linear(d_model, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.normal_(self.router.weight, std=0.02)
        self.last_processed, self.last_tokens = 0, 0
        self.last_agreement: int | None = None
        self.last_aux_losses: dict[str, Tensor] = {}

    def scores(self, x_BLD: Tensor) -> Tensor:
        """r [B, L]: the router's scalar score per token."""
        return self.router(x_BLD).squeeze(-1)

    def predictor_logits(self, x_BLD: Tensor) -> Tensor:
        """[B, L]: the causal predictor's logit that a token is in its sequence's top-C (stop-gradient input)."""
        return self.predictor(x_BLD.detach()).squeeze(-1)

    def forward(
        self, x_BLD: Tensor, run: Callable[[Tensor, Tensor | None, Tensor | None], Tensor], *,
        real_BL: Tensor | None = None,
    ) -> Tensor:
        B, L, D = x_BLD.shape
        r_BL = self.scores(x_BLD)
        if self.training:
            if real_BL is not None:
                raise ValueError("Mixture-of-Depths selects top-C per sequence in training, which has no padding")
            C = capacity_tokens(self.capacity, L)
            index_BC = r_BL.detach().topk(C, dim=1).indices.sort(dim=1).values
            index_BCD = index_BC[..., None].expand(B, C, D)
            x_BCD = x_BLD.gather(1, index_BCD)
            update_BCD = (run(x_BCD, index_BC, None) - x_BCD) * torch.sigmoid(r_BL.gather(1, index_BC))[..., None]
            member_BL = torch.zeros_like(r_BL).scatter(1, index_BC, 1.0)
            predicted_BL = self.predictor_logits(x_BLD)
            bce = F.binary_cross_entropy_with_logits(predicted_BL, member_BL)
            self.last_aux_losses = {"mod_predictor": bce}
            self.last_agreement = int(((predicted_BL.detach() > 0) == member_BL.bool()).sum())
            self.last_processed, self.last_tokens = B * C, B * L
            return x_BLD.scatter_add(1, index_BCD, update_BCD)
        run_BL = self.predictor_logits(x_BLD) > 0
        if real_BL is not None:
            run_BL = run_BL & real_BL
        self.last_aux_losses = {}
        self.last_agreement = None
        if real_BL is None:  # whole sequences: how often the predictor agrees with the top-C training would take
            top_BC = r_BL.detach().topk(capacity_tokens(self.capacity, L), dim=1).indices
            member_BL = torch.zeros_like(run_BL).scatter(1, top_BC, True)
            self.last_agreement = int((member_BL == run_BL).sum())
        self.last_processed = int(run_BL.sum())
        self.last_tokens = B * L if real_BL is None else int(real_BL.sum())
        update_BLD = (run(x_BLD, None, run_BL) - x_BLD) * torch.sigmoid(r_BL)[..., None]
        return x_BLD + torch.where(run_BL[..., None], update_BLD, 0.0)

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}"

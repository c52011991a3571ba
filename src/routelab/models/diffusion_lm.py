"""A masked (absorbing-state) discrete diffusion language model whose feed-forward blocks are MoE layers.

Papers: Simple and Effective Masked Diffusion Language Models (MDLM, Sahoo et al., 2024); Discrete Diffusion Modeling
by Estimating the Ratios of the Data Distribution (SEDD, absorbing state, Lou et al., 2024); Expert-Choice Routing
Enables Adaptive Computation in Diffusion Language Models (the timestep reaching the router).

Shape legend: B batch, L sequence length, V data vocabulary (the network has V + 1 input ids: id V is [MASK]).

The network is `MoETransformerLM` (same blocks, MoE layers, routers, RoPE, tied output) with bidirectional attention
and one extra input id, [MASK]. Every MoE layer's router receives `RoutingContext(timestep=t_B)`, the per-sequence
diffusion time (= the mask probability), besides what the autoregressive model hands it (token ids — here the noised
ids x_t — layer index, step, the previous layer's state), so every registered router runs here; routers flagged
non-causal are used as designed (nothing is generated left to right).

Forward process (linear schedule α_t = 1 - t): each token of x_0 is replaced by [MASK] with probability t,
independently. Objective, the continuous-time negative ELBO of MDLM for this schedule, per token:

    NELBO(x_0) = E_{t ~ U(0, 1]} [ (1/t) · Σ_{l : x_t^l = [MASK]} -log p_θ(x_0^l | x_t) ] / L

(weight α'_t / (1 - α_t) = -1/t in magnitude). With t → 0 nothing is masked and the term is 0 (the ELBO weight
multiplies an empty sum). p_θ never predicts [MASK]: its logit is dropped (MDLM's "zero masking probabilities").
Training draws t low-discrepancy over the batch (t_b = t_min + (1 - t_min)·((u + b/B) mod 1), one u per batch, as
MDLM does) to lower the variance of the estimate.

Validation metric: exp(NELBO per token) — an **upper bound** on the model's perplexity, estimated with fixed
(seeded) t and masks so that every variant sees the same ones. It is not comparable with an autoregressive model's
perplexity (a different factorisation, and a bound rather than the exact likelihood).

Sampling (`sample`): MDLM's ancestral sampler over `steps` uniform steps from t = 1 (all [MASK]) to 0: at step t → s
each still-masked position draws x̂_0 ~ p_θ(· | x_t) and is revealed with probability (t - s)/t; revealed tokens
stay. The last step (s = 0) reveals every remaining position.

Reconstructed (not the authors' code): the network, the t_min = 1e-3 floor of training times, the per-token
normalisation, and the seeded validation estimate.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._checks import check_int, check_number
from routelab.layers.moe import MoELayer, total_aux_loss
from routelab.models.transformer import ModelConfig, MoETransformerLM


def mask_tokens(x0_BL: Tensor, t_B: Tensor, mask_id: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The forward process: (x_t [B, L], masked [B, L] bool), each token masked with probability t_b."""
    u_BL = torch.rand(x0_BL.shape, generator=generator, device=x0_BL.device)
    masked_BL = u_BL < t_B.to(u_BL.dtype)[:, None]
    return torch.where(masked_BL, torch.full_like(x0_BL, mask_id), x0_BL), masked_BL


def nelbo_per_token(logits_BLV: Tensor, x0_BL: Tensor, masked_BL: Tensor, t_B: Tensor) -> Tensor:
    """Mean over the batch of (1/t_b) Σ_{masked l} -log p(x_0^l | x_t) / L. A sequence with nothing masked (t → 0)
    contributes 0."""
    L = x0_BL.shape[1]
    nll_BL = F.cross_entropy(logits_BLV.float().transpose(1, 2), x0_BL, reduction="none")
    masked_sum_B = (nll_BL * masked_BL).sum(-1)
    weighted_B = torch.where(masked_BL.any(-1), masked_sum_B / t_B.to(masked_sum_B.dtype).clamp_min(1e-12), 0.0)
    return weighted_B.mean() / L


def training_times(batch_size: int, *, t_min: float, generator: torch.Generator | None = None) -> Tensor:
    """Low-discrepancy t [B] in [t_min, 1]: one uniform offset, spread evenly over the batch."""
    u = torch.rand((), generator=generator)
    r_B = (u + torch.arange(batch_size) / batch_size) % 1.0
    return t_min + (1 - t_min) * r_B


class MaskedDiffusionLM(nn.Module):
    """`forward(x0 [B, L], *, t=None, generator=None, step=None) -> (loss, nelbo)`: the NELBO per token at times t
    (drawn when None) plus the routers' aux losses; `logits(x_t, t)` the denoiser's [B, L, V] logits; `sample`."""

    def __init__(self, config: ModelConfig, *, t_min: float = 1e-3) -> None:
        super().__init__()
        config.validate()
        if config.mod_capacity is not None:
            raise ValueError("model.mod_capacity (Mixture-of-Depths) is for the autoregressive LM only: its causal "
                             "predictor and top-C over a causal subsequence assume left-to-right attention")
        check_number("t_min", t_min, low=0, high=0.5, open_low=True)
        self.config = config
        self.t_min = float(t_min)
        self.mask_id = config.vocab_size
        self.net = MoETransformerLM(dataclasses.replace(config, vocab_size=config.vocab_size + 1))
        for block in self.net.blocks:
            block.attn.causal = False

    @property
    def moe_layers(self) -> list[MoELayer]:
        return self.net.moe_layers

    @property
    def per_layer_options(self) -> list[dict]:
        return self.net.per_layer_options

    def logits(self, xt_BL: Tensor, t_B: Tensor, *, step: int | None = None) -> Tensor:
        """[B, L, V]: the denoiser's logits over the data vocabulary ([MASK] is never predicted)."""
        if t_B.shape != (xt_BL.shape[0],):
            raise ValueError(f"t must have one time per sequence, shape [{xt_BL.shape[0]}], got {tuple(t_B.shape)}")
        logits_BLV, _ = self.net(xt_BL, step=step, timestep=t_B)
        return logits_BLV[..., : self.mask_id]

    def forward(
        self,
        x0_BL: Tensor,
        *,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
        step: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(loss, nelbo): the NELBO per token (detached copy second) plus `total_aux_loss`; t [B] drawn when None."""
        if x0_BL.dtype != torch.long or x0_BL.dim() != 2:
            raise ValueError(f"x0 must be a [B, L] LongTensor of token ids, got {x0_BL.dtype} {tuple(x0_BL.shape)}")
        if int(x0_BL.max()) >= self.mask_id or int(x0_BL.min()) < 0:
            raise ValueError(f"x0 token ids must lie in [0, vocab_size={self.mask_id})")
        t_B = training_times(x0_BL.shape[0], t_min=self.t_min, generator=generator) if t is None else t
        xt_BL, masked_BL = mask_tokens(x0_BL, t_B, self.mask_id, generator)
        nelbo = nelbo_per_token(self.logits(xt_BL, t_B, step=step), x0_BL, masked_BL, t_B)
        return nelbo + total_aux_loss(self), nelbo.detach()

    @torch.no_grad()
    def sample(
        self, num_samples: int, length: int, *, steps: int, generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> Tensor:
        """LongTensor [num_samples, length] by iterative unmasking over `steps` steps (eval mode, restored after)."""
        check_int("num_samples", num_samples, 1)
        check_int("length", length, 1, self.config.max_seq_len)
        check_int("steps", steps, 1)
        check_number("temperature", temperature, low=0, open_low=True)
        was_training = self.training
        self.eval()
        device = self.net.embed.weight.device
        x_BL = torch.full((num_samples, length), self.mask_id, dtype=torch.long, device=device)
        for i in range(steps):
            t, s = 1 - i / steps, 1 - (i + 1) / steps
            probs_BLV = (self.logits(x_BL, torch.full((num_samples,), t, device=device)).float() / temperature).softmax(-1)
            draw_BL = torch.multinomial(probs_BLV.reshape(-1, probs_BLV.shape[-1]), 1, generator=generator).view_as(x_BL)
            reveal_BL = (x_BL == self.mask_id) & (torch.rand(x_BL.shape, generator=generator) < (t - s) / t)
            x_BL = torch.where(reveal_BL, draw_BL, x_BL)
        if was_training:
            self.train()
        return x_BL

"""A small diffusion transformer (DiT) with MoE feed-forward blocks, class-conditional, trained by flow matching.

Papers: Scalable Diffusion Models with Transformers (DiT, Peebles & Xie, 2023: patch embedding, adaLN-Zero
conditioning on timestep + class); Scaling Diffusion Transformers to 16 Billion Parameters (DiT-MoE: the FFNs as
MoE layers); Flow Matching for Generative Modeling (Lipman et al., 2023) / rectified flow (Liu et al., 2023: the
objective); Classifier-Free Diffusion Guidance (Ho & Salimans, 2022).

Shape legend: B batch, C image channels, H×W image, P patch side, N = (H/P)(W/P) patches (tokens), D model width.

Network: patches of P×P pixels → linear → + learned position embedding; `n_layers` blocks of
    x = x + g1 · Attn(modulate(LN(x), s1, b1));  x = x + g2 · MoE(modulate(LN(x), s2, b2))
with (b1, s1, g1, b2, s2, g2) = Linear(SiLU(c)), c = MLP(sinusoidal(1000·t)) + class embedding (adaLN-Zero: the
modulation is zero-initialised, so every block starts as the identity); a final adaLN + linear back to patches
(zero-initialised). Attention is bidirectional (every patch sees every patch). Every MoE layer's router receives
`RoutingContext(timestep=t_B, token_ids=patch positions, layer_index, step, state)`: images have no token ids, so
hash routing hashes the patch position.

Objective (flow matching with a linear path): x_t = (1 - t)·x_0 + t·ε, ε ~ N(0, I), t ~ U(0, 1); the network
predicts the velocity v = ε - x_0; loss = mean squared error. t = 1 is pure noise, t = 0 the data (the same
direction as the masked-diffusion LM's t: larger t, more noise). The class is replaced by the null class (id
`num_classes`) with probability `label_dropout` during training, so one network is both conditional and
unconditional.

Sampler (`sample`): Euler steps from t = 1 to 0 with classifier-free guidance,
    v = v(x, t, ∅) + w · (v(x, t, y) - v(x, t, ∅));   x ← x - (t - s) · v
(w = 1: the conditional model; the two velocities are separate forwards, so batch-coupled routers never mix the
conditional and unconditional halves).

Reconstructed for this scale (not the authors' code): the sizes, the learned position embedding, flow matching in
place of DiT's DDPM noise prediction, and the Euler sampler.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._checks import check_int, check_number
from routelab.layers.moe import MoELayer, total_aux_loss
from routelab.routing.base import RoutingContext
from routelab.routing.registry import create_router, router_class


@dataclass(frozen=True)
class DiTConfig:
    image_size: int = 8
    channels: int = 1
    patch_size: int = 2
    num_classes: int = 10
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 64
    num_experts: int = 4
    router: str = "topk"
    router_options: dict[str, Any] = field(default_factory=dict)
    label_dropout: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        for name in ("image_size", "channels", "patch_size", "num_classes", "d_model", "n_layers", "n_heads", "d_ff",
                     "num_experts"):
            check_int(name, getattr(self, name), 1)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")
        check_number("label_dropout", self.label_dropout, low=0, high=1)
        router_class(self.router)  # unknown name → ValueError listing the valid ones
        if not isinstance(self.router_options, dict):
            raise ValueError(f"router_options must be a mapping, got {type(self.router_options).__name__}")


def timestep_features(t_B: Tensor, dim: int) -> Tensor:
    """[B, dim]: DiT's sinusoidal embedding of 1000·t (frequencies 10000^(-j/(dim/2)))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    angles = 1000.0 * t_B.float()[:, None] * freqs
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


def modulate(x_BND: Tensor, shift_BD: Tensor, scale_BD: Tensor) -> Tensor:
    return x_BND * (1 + scale_BD[:, None]) + shift_BD[:, None]


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x_BND: Tensor) -> Tensor:
        B, N, D = x_BND.shape
        q, k, v = self.qkv(x_BND).view(B, N, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # bidirectional
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, moe: MoELayer) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(d_model, n_heads)
        self.ffn = moe
        self.ada = nn.Linear(d_model, 6 * d_model)  # adaLN-Zero: zero-initialised by the model


class DiT(nn.Module):
    """`forward(x [B, C, H, W], t [B], y [B], *, step=None) -> v [B, C, H, W]`, the predicted velocity; y may hold
    the null class `num_classes`. `loss(x0, y, generator=...)` the flow-matching loss (+ aux); `sample(...)`."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = cfg = config
        D, P = cfg.d_model, cfg.patch_size
        self.grid = cfg.image_size // P
        self.num_patches = self.grid**2
        self.patch_dim = cfg.channels * P * P
        self.patch_embed = nn.Linear(self.patch_dim, D)
        self.pos_embed = nn.Parameter(torch.randn(self.num_patches, D) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.class_embed = nn.Embedding(cfg.num_classes + 1, D)  # the last id is the null class (CFG)
        shared = router_class(cfg.router).shared_modules(d_model=D, num_experts=cfg.num_experts, **cfg.router_options)
        self.blocks = nn.ModuleList(
            DiTBlock(D, cfg.n_heads, MoELayer(D, cfg.d_ff, create_router(
                cfg.router, d_model=D, num_experts=cfg.num_experts, **{**cfg.router_options, **shared})))
            for _ in range(cfg.n_layers)
        )
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(D, 2 * D)
        self.final = nn.Linear(D, self.patch_dim)
        for layer in [block.ada for block in self.blocks] + [self.final_ada, self.final]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.class_embed.weight, std=0.02)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [block.ffn for block in self.blocks]

    def patchify(self, x_BCHW: Tensor) -> Tensor:
        B, C, H, W = x_BCHW.shape
        P, G = self.config.patch_size, self.grid
        return x_BCHW.reshape(B, C, G, P, G, P).permute(0, 2, 4, 1, 3, 5).reshape(B, G * G, C * P * P)

    def unpatchify(self, p_BNQ: Tensor) -> Tensor:
        B = p_BNQ.shape[0]
        C, P, G = self.config.channels, self.config.patch_size, self.grid
        return p_BNQ.reshape(B, G, G, C, P, P).permute(0, 3, 1, 4, 2, 5).reshape(B, C, G * P, G * P)

    def forward(self, x_BCHW: Tensor, t_B: Tensor, y_B: Tensor, *, step: int | None = None) -> Tensor:
        cfg = self.config
        expected = (cfg.channels, cfg.image_size, cfg.image_size)
        if x_BCHW.dim() != 4 or tuple(x_BCHW.shape[1:]) != expected:
            raise ValueError(f"x must be [B, {', '.join(map(str, expected))}], got {tuple(x_BCHW.shape)}")
        B = x_BCHW.shape[0]
        if t_B.shape != (B,) or y_B.shape != (B,):
            raise ValueError(f"t and y must have shape [{B}], got {tuple(t_B.shape)} and {tuple(y_B.shape)}")
        if int(y_B.min()) < 0 or int(y_B.max()) > cfg.num_classes:
            raise ValueError(f"y must hold class ids in [0, {cfg.num_classes}] ({cfg.num_classes}: the null class)")
        h_BND = self.patch_embed(self.patchify(x_BCHW)) + self.pos_embed
        c_BD = self.time_mlp(timestep_features(t_B, cfg.d_model)) + self.class_embed(y_B)
        positions_BN = torch.arange(self.num_patches, device=x_BCHW.device).expand(B, -1)
        state = None
        for i, block in enumerate(self.blocks):
            b1, s1, g1, b2, s2, g2 = block.ada(F.silu(c_BD)).chunk(6, dim=-1)
            h_BND = h_BND + g1[:, None] * block.attn(modulate(block.norm1(h_BND), b1, s1))
            ctx = RoutingContext(token_ids=positions_BN, layer_index=i, step=step, state=state, timestep=t_B)
            y_BND, decision = block.ffn.forward_with_decision(modulate(block.norm2(h_BND), b2, s2), ctx)
            h_BND = h_BND + g2[:, None] * y_BND
            state = decision.state
        shift, scale = self.final_ada(F.silu(c_BD)).chunk(2, dim=-1)
        return self.unpatchify(self.final(modulate(self.final_norm(h_BND), shift, scale)))

    def loss(self, x0_BCHW: Tensor, y_B: Tensor, *, generator: torch.Generator | None = None,
             step: int | None = None) -> tuple[Tensor, Tensor]:
        """(loss, mse): the flow-matching MSE (detached copy second) plus `total_aux_loss`; labels dropped to the
        null class with probability `label_dropout`."""
        B = x0_BCHW.shape[0]
        t_B = torch.rand(B, generator=generator)
        eps = torch.randn(x0_BCHW.shape, generator=generator)
        drop_B = torch.rand(B, generator=generator) < self.config.label_dropout
        y_B = torch.where(drop_B, torch.full_like(y_B, self.null_class), y_B)
        xt = (1 - t_B)[:, None, None, None] * x0_BCHW + t_B[:, None, None, None] * eps
        mse = F.mse_loss(self(xt, t_B, y_B, step=step), eps - x0_BCHW)
        return mse + total_aux_loss(self), mse.detach()

    @torch.no_grad()
    def sample(self, y_B: Tensor, *, steps: int = 32, guidance: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """Images [B, C, H, W] of classes y_B by `steps` Euler steps with guidance scale `guidance` (eval mode,
        restored after)."""
        check_int("steps", steps, 1)
        check_number("guidance", guidance, low=0)
        if y_B.dim() != 1 or int(y_B.min()) < 0 or int(y_B.max()) >= self.config.num_classes:
            raise ValueError(f"y must be a 1-D tensor of class ids in [0, {self.config.num_classes})")
        was_training = self.training
        self.eval()
        cfg, B = self.config, y_B.shape[0]
        x = torch.randn((B, cfg.channels, cfg.image_size, cfg.image_size), generator=generator)
        null_B = torch.full_like(y_B, self.null_class)
        for i in range(steps):
            t, s = 1 - i / steps, 1 - (i + 1) / steps
            t_B = torch.full((B,), t)
            v_uncond = self(x, t_B, null_B)
            v = v_uncond + guidance * (self(x, t_B, y_B) - v_uncond)
            x = x - (t - s) * v
        if was_training:
            self.train()
        return x

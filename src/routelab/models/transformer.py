"""A small decoder-only language model whose feed-forward blocks are MoE layers (or dense on chosen layers).

Pre-norm blocks: x + attn(rmsnorm(x)), then x + ffn(rmsnorm(x)); rotary positions; causal attention through
`F.scaled_dot_product_attention`; SwiGLU feed-forward, an `MoELayer` on every `moe_every`-th layer (the last layer of
each group of `moe_every`) and a dense SwiGLU elsewhere; the output projection is the embedding matrix (tied).

Shape legend: B batch, L sequence length, D model width, H heads, Dh head width, V vocabulary.

Routers come from the registry by name and options, one per MoE layer; `Router.shared_modules` is called once per
model so that shared router parts (a recurrent router's cell) are the same objects in every layer. Every MoE layer
receives a `RoutingContext(token_ids, layer_index, step, state)`, the state being what the previous MoE layer's
decision handed on, so every registered router works here without special cases.

Incremental decoding: `forward(ids, cache=model.new_cache(B, capacity))` runs the next tokens of B cached sequences
(`kv_cache.DecodeCache`: attention keys/values per block, a `RouterCache` per MoE layer in the routing context, so a
router that reads earlier tokens finds them there). Only causal routers decode; `models.decoding.generate` drives it.

Mixture-of-Depths (`mod_capacity`, layers/depth.py): on a routed block, `Block.mod` chooses the tokens that run the
block and adds their router-weighted update; the block itself runs through the same `run_block`, on a gathered
subsequence at its original rotary positions (training) or on every row with the skipped ones masked out of
attention and routing (eval mode, decoding: the cache records per routed block which slots ran it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._checks import short_repr
from routelab.experts.base import ExpertBank
from routelab.experts.heterogeneous import HeterogeneousSwiGLUExperts
from routelab.experts.reused import ProgressiveScaling, ReusedExperts, window
from routelab.experts.swiglu import SwiGLUExperts
from routelab.layers.chain import ChainOfExpertsLayer
from routelab.layers.depth import MixtureOfDepths
from routelab.layers.moe import MoELayer, total_aux_loss
from routelab.models.kv_cache import DecodeCache
from routelab.models.schedules import SHAPES, k_schedule
from routelab.routing.base import RoutingContext, RoutingDecision
from routelab.routing.registry import create_router, router_class, router_options

EXPERT_POOLS = ("per_layer", "unipool", "rexmoe")
MAX_CHAIN_ITERATIONS = 16


@dataclass(frozen=True)
class ModelConfig:
    """Keyword-only model configuration; `validate()` checks it (called by the model).

    router / router_options: registry name and options of every MoE layer's router.
    k_schedule: None, or {"shape": one of SHAPES, "k_max": int, "k": int (optional), "match_budget": bool (default
        True)}; sets the router's `k` option per MoE layer (or `max_k` for routers without `k`, e.g. top_p). The
        uniform budget the layer mean matches is the scheduled option's value in router_options (`k`, or `max_k`),
        else the schedule's `k`, else the router's default `k`, else 2; giving both with different values is an
        error, since one of them would be ignored.
    dense_d_ff: width of the dense FFN on non-MoE layers (default: d_ff).
    chain_iterations: C ≥ 1; C > 1 makes every MoE layer a Chain-of-Experts layer (layers/chain.py): C iterations
        over the same experts, each with its own router (default 1: the plain layer).
    expert_pool: "per_layer" (default: each MoE layer owns its experts), "unipool" (UniPool: one pool of
        `num_experts` experts, the same tensors in every MoE layer, each layer with its own router over the pool)
        or "rexmoe" (ReXMoE, experts/reused.py: each layer routes over its own experts and those of `reuse_window`
        layers on either side, E·(2·reuse_window+1) candidates).
    reuse_window: r ≥ 0 for expert_pool "rexmoe" (0: the plain per-layer layer).
    reuse_schedule: None (default: every layer routes over its whole window from the first step) or {"start": t_s,
        "end": t_e} in training steps: ReXMoE's progressive scaling routing (experts/reused.py), the candidates a
        router may choose widening linearly from the layer's own experts at step t_s to the whole window after
        t_e; needs expert_pool "rexmoe" with reuse_window ≥ 1 and a router that can restrict its choice (topk).
        Eval-mode forwards use the whole window.
    expert_widths: None (default: every expert has width d_ff) or one width per expert (Duo-LLM's small / big
        experts; experts/heterogeneous.py); FLOPs are counted per width, relative to d_ff.
    mod_capacity: None (default) or a fraction in (0, 1]: Mixture-of-Depths (layers/depth.py); every `mod_every`-th
        block (the last of each group) processes only ⌈mod_capacity · L⌉ tokens per sequence in training (top-C of
        a scalar router), the others ride the residual; eval-mode forwards and decoding select with a causal
        predictor. Needs routers that hand no state from one MoE layer to the next (not recurrent, pregate).
    mod_every: routed blocks are those i with (i + 1) % mod_every == 0 (default 2: every other block, the paper's).
    The last seven are left out of `to_dict` at their defaults, so a model that does not use them saves the same
    config.json as before they existed (and older model folders, which lack them, still load).
    """

    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 256
    num_experts: int = 8
    moe_every: int = 1
    shared_experts: int = 0
    dense_d_ff: int | None = None
    max_seq_len: int = 1024
    rope_base: float = 10000.0
    router: str = "topk"
    router_options: dict[str, Any] = field(default_factory=dict)
    k_schedule: dict[str, Any] | None = None
    chain_iterations: int = 1
    expert_pool: str = "per_layer"
    expert_widths: list[int] | None = None
    reuse_window: int = 0
    reuse_schedule: dict[str, int] | None = None
    mod_capacity: float | None = None
    mod_every: int = 2

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name, default in OPTIONAL_FIELDS.items():
            if out[name] == default:
                del out[name]
        return out

    def moe_layer_indices(self) -> list[int]:
        """Block indices that hold an MoE layer: the last block of each group of `moe_every`."""
        return [i for i in range(self.n_layers) if (i + 1) % self.moe_every == 0]

    def mod_block_indices(self) -> list[int]:
        """Block indices routed by Mixture-of-Depths (none without mod_capacity): the last of each group of
        `mod_every`."""
        if self.mod_capacity is None:
            return []
        return [i for i in range(self.n_layers) if (i + 1) % self.mod_every == 0]

    def per_layer_router_options(self) -> list[dict[str, Any]]:
        """The router options of each MoE layer (the k schedule applied), validated against the registry."""
        n_moe = len(self.moe_layer_indices())
        options = [dict(self.router_options) for _ in range(n_moe)]
        if self.k_schedule is None:
            return options
        if not isinstance(self.k_schedule, dict):
            raise ValueError(
                f"k_schedule must be null or a mapping {{shape, k_max, k, match_budget}}, got {self.k_schedule!r}"
            )
        sched = dict(self.k_schedule)
        unknown = sorted(set(sched) - {"shape", "k_max", "k", "match_budget"})
        if unknown:
            raise ValueError(f"k_schedule has no field(s) {', '.join(unknown)}; valid: shape, k_max, k, match_budget")
        if "shape" not in sched or "k_max" not in sched:
            raise ValueError(f"k_schedule needs 'shape' (one of {', '.join(SHAPES)}) and 'k_max'")
        match_budget = sched.get("match_budget", True)
        if not isinstance(match_budget, bool):
            raise ValueError(f"k_schedule.match_budget must be true or false, got {match_budget!r}")
        valid = router_options(self.router)
        key = "k" if "k" in valid else "max_k" if "max_k" in valid else None
        if key is None:
            raise ValueError(
                f"router {self.router!r} has neither a 'k' nor a 'max_k' option, so a k_schedule cannot apply"
            )
        if key in self.router_options and "k" in sched and self.router_options[key] != sched["k"]:
            raise ValueError(
                f"router option {key}={self.router_options[key]!r} and k_schedule.k={sched['k']!r} both set the "
                f"budget the schedule matches; give one of them (or the same value)"
            )
        default = valid.get("k") if key == "k" else None
        budget = self.router_options.get(key, sched.get("k", default if isinstance(default, int) else 2))
        ks = k_schedule(sched["shape"], n_moe, k_max=sched["k_max"], k=budget, match_budget=match_budget)
        for opts, k in zip(options, ks):
            opts[key] = k
        return options

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "num_experts", "moe_every", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {short_repr(value)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"model.d_model={self.d_model} must be a multiple of n_heads={self.n_heads} with an even head width"
            )
        if self.moe_every > self.n_layers:
            raise ValueError(f"model.moe_every={self.moe_every} exceeds n_layers={self.n_layers}: no MoE layer")
        if not isinstance(self.shared_experts, int) or isinstance(self.shared_experts, bool) or self.shared_experts < 0:
            raise ValueError(f"model.shared_experts must be an integer >= 0, got {short_repr(self.shared_experts)}")
        if self.dense_d_ff is not None and (
            not isinstance(self.dense_d_ff, int) or isinstance(self.dense_d_ff, bool) or self.dense_d_ff < 1
        ):
            raise ValueError(f"model.dense_d_ff must be a positive integer or null (= d_ff), got {short_repr(self.dense_d_ff)}")
        rope = self.rope_base
        if not isinstance(rope, (int, float)) or isinstance(rope, bool) or not math.isfinite(rope) or rope <= 0:
            raise ValueError(f"model.rope_base must be a finite number > 0, got {short_repr(rope)}")
        c = self.chain_iterations
        if not isinstance(c, int) or isinstance(c, bool) or not 1 <= c <= MAX_CHAIN_ITERATIONS:
            raise ValueError(f"model.chain_iterations must be an integer from 1 to {MAX_CHAIN_ITERATIONS}, got "
                             f"{short_repr(c)}")
        if self.expert_pool not in EXPERT_POOLS:
            raise ValueError(f"model.expert_pool must be one of {', '.join(EXPERT_POOLS)}, got "
                             f"{short_repr(self.expert_pool)}")
        r = self.reuse_window
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"model.reuse_window must be an integer >= 0, got {short_repr(r)}")
        if r and self.expert_pool != "rexmoe":
            raise ValueError(f"model.reuse_window={r} needs model.expert_pool: rexmoe (got {self.expert_pool!r})")
        self._validate_reuse_schedule()
        widths = self.expert_widths
        if widths is not None and (
            not isinstance(widths, (list, tuple)) or len(widths) != self.num_experts
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths)
        ):
            raise ValueError(f"model.expert_widths must be null or a list of num_experts={self.num_experts} positive "
                             f"integers (one width per expert), got {short_repr(widths)}")
        router_cls = router_class(self.router)  # unknown name → ValueError listing the valid ones
        cap = self.mod_capacity
        if cap is not None and (not isinstance(cap, (int, float)) or isinstance(cap, bool) or not 0 < cap <= 1):
            raise ValueError(f"model.mod_capacity must be null (no Mixture-of-Depths) or a number in (0, 1] (the "
                             f"fraction of each sequence's tokens a routed block processes), got {short_repr(cap)}")
        every = self.mod_every
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"model.mod_every must be a positive integer, got {short_repr(every)}")
        if cap is not None and every > self.n_layers:
            raise ValueError(f"model.mod_every must be an integer from 1 to n_layers={self.n_layers} (a larger one "
                             f"routes no block), got {every}")
        if cap is None and every != OPTIONAL_FIELDS["mod_every"]:
            raise ValueError(f"model.mod_every={every} needs model.mod_capacity (a fraction in (0, 1]) to route blocks")
        if cap is not None and router_cls.hands_on_state:
            raise ValueError(f"model.mod_capacity cannot combine with router {self.router!r}: it hands per-token "
                             "routing state from one MoE layer to the next, which tokens that skip a block break")
        if not isinstance(self.router_options, dict):
            raise ValueError(f"router options must be a mapping, got {short_repr(self.router_options)}")

    def _validate_reuse_schedule(self) -> None:
        sched = self.reuse_schedule
        if sched is None:
            return
        if not isinstance(sched, dict):
            raise ValueError(f"model.reuse_schedule must be null or a mapping {{start, end}} (training steps), got "
                             f"{short_repr(sched)}")
        unknown = sorted(set(sched) - {"start", "end"})
        if unknown:
            raise ValueError(f"model.reuse_schedule has no field(s) {', '.join(map(str, unknown))}; valid: start, end")
        if set(sched) != {"start", "end"}:
            raise ValueError(f"model.reuse_schedule needs both 'start' and 'end' (training steps), got "
                             f"{short_repr(sched)}")
        start, end = sched["start"], sched["end"]
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise ValueError(f"model.reuse_schedule.start must be an integer >= 0 (a training step), got "
                             f"{short_repr(start)}")
        if not isinstance(end, int) or isinstance(end, bool) or end <= start:
            raise ValueError(f"model.reuse_schedule.end must be an integer > start={start} (a training step), got "
                             f"{short_repr(end)}")
        if self.expert_pool != "rexmoe" or self.reuse_window < 1:
            raise ValueError(f"model.reuse_schedule needs model.expert_pool: rexmoe with reuse_window >= 1 (got "
                             f"expert_pool={self.expert_pool!r}, reuse_window={self.reuse_window!r})")


# Fields a config may omit (to_dict leaves them out at these values): their default is the plain model.
OPTIONAL_FIELDS = {"chain_iterations": 1, "expert_pool": "per_layer", "expert_widths": None, "reuse_window": 0,
                   "reuse_schedule": None, "mod_capacity": None, "mod_every": 2}


class RMSNorm(nn.Module):
    def __init__(self, d_model: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(max_len: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos, sin [max_len, head_dim/2] for rotary positions (rotating pairs (x[2i], x[2i+1]))."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BHLK: Tensor, cos_LK2: Tensor, sin_LK2: Tensor) -> Tensor:
    x1, x2 = x_BHLK[..., 0::2], x_BHLK[..., 1::2]
    out = torch.stack((x1 * cos_LK2 - x2 * sin_LK2, x1 * sin_LK2 + x2 * cos_LK2), dim=-1)
    return out.flatten(-2)


class Attention(nn.Module):
    # False: every position attends to every other (the masked-diffusion LM, `models.diffusion_lm`).
    causal: bool = True

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(
        self, x_BLD: Tensor, cos: Tensor, sin: Tensor, kv: _KVStep | None = None, layer: int = 0, *,
        positions_BL: Tensor | None = None, mask_B1LS: Tensor | None = None,
    ) -> Tensor:
        """Causal (or, with `causal` False, bidirectional) self-attention over x; with `kv` (decoding, causal only),
        over the cached slots of block `layer` and x. Mixture-of-Depths blocks pass `positions_BL` (the rows'
        own rotary positions, without kv: a gathered subsequence) or `mask_B1LS` (which keys each query sees,
        replacing the causal pattern or kv's mask)."""
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(x_BLD).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # [B, H, L, Dh]
        if kv is None:
            if positions_BL is None:
                cos, sin = cos[:L], sin[:L]
            else:
                cos, sin = cos[positions_BL][:, None], sin[positions_BL][:, None]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            causal = self.causal and mask_B1LS is None
            y_BHLK = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1LS, is_causal=causal)
        else:
            q, k = apply_rope(q, kv.cos_B1LK, kv.sin_B1LK), apply_rope(k, kv.cos_B1LK, kv.sin_B1LK)
            k, v = kv.cache.store(layer, k, v)
            mask_B1LS = kv.mask_B1LS if mask_B1LS is None else mask_B1LS
            causal = mask_B1LS is None and L > 1
            y_BHLK = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1LS, is_causal=causal)
        return self.proj(y_BHLK.transpose(1, 2).reshape(B, L, D))


@dataclass(frozen=True)
class _KVStep:
    """What every block's attention needs from the decode cache in one forward: the new tokens' rotary tables (at
    each row's own positions) and the attention mask over the filled slots (None: plain causal)."""

    cache: DecodeCache
    cos_B1LK: Tensor
    sin_B1LK: Tensor
    mask_B1LS: Tensor | None


class DenseSwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """attn_norm, attn, ffn_norm, ffn (an MoELayer or a DenseSwiGLU) and, on a Mixture-of-Depths block, `mod`
    (the token selection, layers/depth.py; None elsewhere)."""

    def __init__(self, cfg: ModelConfig, moe: MoELayer | None, *, routed: bool = False) -> None:
        super().__init__()
        self.attn_norm, self.ffn_norm = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        self.ffn: nn.Module = moe if moe is not None else DenseSwiGLU(cfg.d_model, cfg.dense_d_ff or cfg.d_ff)
        self.mod = MixtureOfDepths(cfg.d_model, capacity=cfg.mod_capacity) if routed else None


class MoETransformerLM(nn.Module):
    """`forward(ids [B, L], targets [B, L] | None, step=None) -> (logits [B, L, V], loss | None)`.

    The loss is the mean next-token cross-entropy plus `total_aux_loss(self)` (the routers' aux losses of this
    forward). `moe_layers` lists the MoE layers bottom-up; `per_layer_options` the router options each received.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        cfg = config
        moe_at = cfg.moe_layer_indices()
        self.per_layer_options = cfg.per_layer_router_options()
        shared = router_class(cfg.router).shared_modules(
            d_model=cfg.d_model, num_experts=cfg.num_experts, **cfg.router_options
        )
        pool = self._expert_bank() if cfg.expert_pool == "unipool" else None  # UniPool: one bank, every layer
        own = [self._expert_bank() for _ in moe_at] if cfg.expert_pool == "rexmoe" else None
        num_experts = cfg.num_experts * len(window(0, len(moe_at), cfg.reuse_window)) if own else cfg.num_experts
        moe_layers: dict[int, MoELayer] = {}
        for j, i in enumerate(moe_at):
            def router() -> nn.Module:
                return create_router(
                    cfg.router, d_model=cfg.d_model, num_experts=num_experts, **{**self.per_layer_options[j], **shared}
                )
            schedule = None
            if own is not None:  # ReXMoE: this layer's experts and its neighbours', the same tensors
                near = window(j, len(moe_at), cfg.reuse_window)
                experts = ReusedExperts([own[n] for n in near], own=near.index(j))
                if cfg.reuse_schedule is not None:
                    first = near.index(j) * cfg.num_experts
                    schedule = ProgressiveScaling(**cfg.reuse_schedule, num_candidates=num_experts,
                                                  own=(first, first + cfg.num_experts), layer=j)
            else:
                experts = pool if pool is not None else self._expert_bank()
            if cfg.chain_iterations > 1:
                moe_layers[i] = ChainOfExpertsLayer(
                    cfg.d_model, cfg.d_ff, router(), extra_routers=[router() for _ in range(cfg.chain_iterations - 1)],
                    shared_experts=cfg.shared_experts, experts=experts, candidate_schedule=schedule,
                )
            else:
                moe_layers[i] = MoELayer(cfg.d_model, cfg.d_ff, router(), shared_experts=cfg.shared_experts,
                                         experts=experts, candidate_schedule=schedule)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        routed = set(cfg.mod_block_indices())
        self.blocks = nn.ModuleList(Block(cfg, moe_layers.get(i), routed=i in routed) for i in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model)
        cos, sin = rope_tables(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _expert_bank(self) -> ExpertBank | None:
        """A routed expert bank of the configured widths; None: the layer builds its default SwiGLU bank."""
        cfg = self.config
        if cfg.expert_widths is not None:
            return HeterogeneousSwiGLUExperts(list(cfg.expert_widths), cfg.d_model, cfg.d_ff)
        return SwiGLUExperts(cfg.num_experts, cfg.d_model, cfg.d_ff) if cfg.expert_pool != "per_layer" else None

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoELayer)]

    @property
    def causal(self) -> bool:
        """True when every MoE layer's router is causal (a token's routing depends only on it and earlier tokens)
        and, with Mixture-of-Depths, in eval mode (training selects each sequence's top-C, a causal predictor
        selects in eval mode)."""
        return not _non_causal(self)

    def _init_weights(self) -> None:
        # GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2·n_layers). Expert banks and routers
        # keep their own initialisation (they own it), except the experts' down projection, scaled likewise.
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.embed.weight, std=0.02)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=0.02)
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            if isinstance(block.ffn, DenseSwiGLU):
                nn.init.normal_(block.ffn.gate_up.weight, std=0.02)
                nn.init.normal_(block.ffn.down.weight, std=residual_std)
            else:
                banks = [block.ffn.experts, block.ffn.shared_experts]
                if isinstance(block.ffn.experts, ReusedExperts):
                    banks[:1] = list(block.ffn.experts.banks)
                for bank in banks:
                    if isinstance(bank, SwiGLUExperts):
                        nn.init.normal_(bank.w_gate_up, std=0.02)
                        nn.init.normal_(bank.w_down, std=residual_std)
                    elif isinstance(bank, HeterogeneousSwiGLUExperts):
                        for gate_up, down in zip(bank.w_gate_up, bank.w_down):
                            nn.init.normal_(gate_up, std=0.02)
                            nn.init.normal_(down, std=residual_std)

    def new_cache(self, batch_size: int, capacity: int) -> DecodeCache:
        """An empty decode cache for `batch_size` sequences of up to `capacity` tokens (≤ max_seq_len)."""
        if not isinstance(capacity, int) or not 1 <= capacity <= self.config.max_seq_len:
            raise ValueError(f"cache capacity must be an integer in [1, max_seq_len={self.config.max_seq_len}], got {capacity!r}")
        return DecodeCache(
            num_layers=self.config.n_layers,
            num_moe_layers=len(self.moe_layers),
            batch_size=batch_size,
            capacity=capacity,
        )

    def _routed_run(
        self, block: Block, i: int, kv: _KVStep | None, ctx: RoutingContext | None
    ) -> Callable[[Tensor, Tensor | None, Tensor | None], Tensor]:
        """Block i as its `MixtureOfDepths` runs it: on the gathered top-C rows at their original rotary positions
        (index_BC, training), or on every row with the skipped ones (run_BL False) hidden from attention and from
        the MoE layer's routing (eval mode and decoding)."""
        cos, sin = self.rope_cos, self.rope_sin

        def run(x_BND: Tensor, index_BC: Tensor | None, run_BL: Tensor | None) -> Tensor:
            if index_BC is not None:  # in position order, so the plain causal pattern is the subsequence's
                sub = None if ctx is None else ctx.replace(token_ids=ctx.token_ids.gather(1, index_BC))
                return run_block(block, i, x_BND, cos, sin, None, sub, positions_BL=index_BC)[0]
            if kv is not None:
                mask_B1LS = kv.cache.routed_mask(i, run_BL)
            else:
                L = run_BL.shape[1]
                causal_LL = torch.ones(L, L, dtype=torch.bool, device=run_BL.device).tril()
                self_LL = torch.eye(L, dtype=torch.bool, device=run_BL.device)
                mask_B1LS = ((causal_LL & run_BL[:, None, :]) | self_LL)[:, None]
            sub = None if ctx is None else ctx.replace(padding_mask=~run_BL)  # skipped rows are not routed
            return run_block(block, i, x_BND, cos, sin, kv, sub, mask_B1LS=mask_B1LS)[0]

        return run

    def forward(
        self,
        ids: Tensor,
        targets: Tensor | None = None,
        *,
        step: int | None = None,
        cache: DecodeCache | None = None,
        padding_mask: Tensor | None = None,
        timestep: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """With `cache` (incremental decoding), `ids` are the next tokens of the cached sequences and attend to every
        earlier one; `padding_mask` [B, L] (True: padding, only with a cache) marks slots that hold no token;
        `timestep` [B] (diffusion time per sequence, `models.diffusion_lm`) reaches every router's context."""
        B, L = ids.shape
        if L > self.config.max_seq_len:
            raise ValueError(f"sequence length {L} exceeds model.max_seq_len={self.config.max_seq_len}")
        if padding_mask is not None and cache is None:
            raise ValueError("padding_mask needs a decode cache (model.new_cache); training windows have no padding")
        kv, real_BL = None, None
        if cache is not None:
            if not self.causal:
                raise ValueError(
                    "incremental decoding needs causal routers: " + ", ".join(_non_causal(self)) + " route a token "
                    "by looking at later tokens of its batch, so generating one token at a time would change them"
                )
            real_BL = torch.ones_like(ids, dtype=torch.bool) if padding_mask is None else ~padding_mask.bool()
            positions_BL, mask_B1LS = cache.begin(real_BL)
            kv = _KVStep(cache, self.rope_cos[positions_BL][:, None], self.rope_sin[positions_BL][:, None], mask_B1LS)
        x_BLD = self.embed(ids)
        state, moe_index = None, 0
        for i, block in enumerate(self.blocks):
            ctx = None
            if isinstance(block.ffn, MoELayer):
                ctx = RoutingContext(
                    token_ids=ids,
                    layer_index=moe_index,
                    step=step,
                    state=state,
                    padding_mask=padding_mask,
                    timestep=timestep,
                    cache=None if cache is None else cache.routers[moe_index],
                )
                moe_index += 1
            if block.mod is None:
                x_BLD, decision = run_block(block, i, x_BLD, self.rope_cos, self.rope_sin, kv, ctx)
                state = state if decision is None else decision.state
            else:  # real_BL: None without a cache (whole sequences), the cache's real slots when decoding
                x_BLD = block.mod(x_BLD, self._routed_run(block, i, kv, ctx), real_BL=real_BL)
        logits_BLV = F.linear(self.final_norm(x_BLD), self.embed.weight)
        if targets is None:
            return logits_BLV, None
        lm_loss = F.cross_entropy(logits_BLV.reshape(-1, logits_BLV.shape[-1]).float(), targets.reshape(-1))
        return logits_BLV, lm_loss + total_aux_loss(self)


def run_block(
    block: Block, i: int, x_BLD: Tensor, cos: Tensor, sin: Tensor, kv: _KVStep | None, ctx: RoutingContext | None,
    *, positions_BL: Tensor | None = None, mask_B1LS: Tensor | None = None,
) -> tuple[Tensor, RoutingDecision | None]:
    """One pre-norm block on x: x + attn(norm(x)), then + ffn(norm(·)); the MoE layer's decision (None: dense).
    The model's forward runs every block through it, and so does `inference.retrofit`'s skip/repeat execution."""
    x_BLD = x_BLD + block.attn(block.attn_norm(x_BLD), cos, sin, kv, i, positions_BL=positions_BL, mask_B1LS=mask_B1LS)
    h_BLD = block.ffn_norm(x_BLD)
    if ctx is None:
        return x_BLD + block.ffn(h_BLD), None
    y_BLD, decision = block.ffn.forward_with_decision(h_BLD, ctx)
    return x_BLD + y_BLD, decision


def _non_causal(model: MoETransformerLM) -> list[str]:
    """'layer i: router (why)' for each MoE layer whose router is not causal in the model's current mode, and the
    Mixture-of-Depths blocks in training mode."""
    found = []
    for i, layer in enumerate(model.moe_layers):
        if not layer.router.causal:
            found.append(f"MoE layer {i}'s router {type(layer.router).registry_name!r}")
    found += [f"Mixture-of-Depths block {i} (top-C per sequence in training mode)"
              for i, block in enumerate(model.blocks) if block.mod is not None and block.mod.training]
    return found

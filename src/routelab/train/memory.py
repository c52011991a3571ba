"""How much memory training a `MoETransformerLM` needs, estimated from the configurations alone (nothing is built).

An absurd size in a configuration (`d_model: 1000000000`, `batch_size: 100000000`, `max_seq_len: 100000000`) must
be refused before anything allocates it: `check_training_memory` compares this estimate with the machine's RAM and
names the largest term and its fields. The estimate is a lower bound of what the training loop holds at its peak,
in fp32: parameters with their gradients and the two AdamW moments (16 bytes per parameter), the rotary tables, and
the activations one step keeps for the backward pass (per block a few [B, L, D] tensors, the attention scores,
the experts' hidden rows; the logits and their gradient) — or, when larger, an evaluation batch's forward.
"""

from __future__ import annotations

import os
from typing import Any

FP32 = 4
GiB = 1 << 30


def machine_memory_bytes() -> int | None:
    """Physical RAM of this machine, or None when the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def training_memory_terms(model: Any, train: Any) -> dict[str, tuple[int, str]]:
    """{term: (bytes, the fields that set it)} for a ModelConfig `model` and a TrainConfig `train` (validated
    integers; only arithmetic on Python ints, so any size is safe to estimate)."""
    D, V, F, E, H = model.d_model, model.vocab_size, model.d_ff, model.num_experts, model.n_heads
    n_moe = len(range(model.moe_every - 1, model.n_layers, model.moe_every))
    n_dense = model.n_layers - n_moe
    dense_f = model.dense_d_ff or F
    k = model.router_options.get("k", 2) if isinstance(model.router_options, dict) else 2
    k = k if isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= E else min(2, E)
    B, L = train.batch_size, train.seq_len
    eval_B = min(train.eval_batch_size, train.eval_windows)
    tokens = B * L
    per_param = 4 * FP32  # weight, gradient, two AdamW moments
    terms = {
        "embedding": (V * D * per_param, "vocab_size × d_model"),
        "attention weights": (model.n_layers * 4 * D * D * per_param, "n_layers × d_model²"),
        "expert weights": (n_moe * (E * 3 * D * F + E * D) * per_param, "MoE layers × num_experts × d_model × d_ff"),
        "shared and dense FFN weights": (
            (n_moe * model.shared_experts * 3 * D * F + n_dense * 3 * D * dense_f) * per_param,
            "shared_experts / dense_d_ff × d_model",
        ),
        # angles, cos and sin, each [max_seq_len, head width / 2], exist together while the tables are built
        "rotary tables": (3 * model.max_seq_len * (D // H // 2) * FP32, "max_seq_len × d_model / n_heads"),
        "activations": (
            model.n_layers * (tokens * D * 12 + B * H * L * L * 2 + tokens * k * F * 3) * FP32,
            "n_layers × batch_size × seq_len × (d_model, seq_len, d_ff)",
        ),
        "logits": (max(tokens * 3, eval_B * L) * V * FP32, "batch_size × seq_len × vocab_size"),
    }
    return terms


def check_training_memory(model: Any, train: Any, *, available: int | None = None, prefix: str = "") -> int:
    """Raise a ValueError naming the largest term and its fields when the estimate exceeds `available` bytes
    (default: this machine's RAM); returns the estimate in bytes."""
    terms = training_memory_terms(model, train)
    total = sum(b for b, _ in terms.values())
    limit = machine_memory_bytes() if available is None else available
    if limit is not None and total > limit:
        name, (size, fields) = max(terms.items(), key=lambda kv: kv[1][0])
        raise ValueError(
            f"{prefix}training this model needs at least {total / GiB:,.1f} GiB, more than this machine's "
            f"{limit / GiB:,.1f} GiB of RAM; the largest part is the {name} ({fields}: {size / GiB:,.1f} GiB) — "
            f"make {_fields_hint(name, model, train)} smaller"
        )
    return total


def _fields_hint(term: str, model: Any, train: Any) -> str:
    hints = {
        "embedding": f"model.vocab_size={model.vocab_size} or model.d_model={model.d_model}",
        "attention weights": f"model.d_model={model.d_model} or model.n_layers={model.n_layers}",
        "expert weights": f"model.num_experts={model.num_experts}, model.d_model={model.d_model} or "
                          f"model.d_ff={model.d_ff}",
        "shared and dense FFN weights": f"model.shared_experts={model.shared_experts}, model.d_ff={model.d_ff} or "
                                        f"model.dense_d_ff={model.dense_d_ff}",
        "rotary tables": f"model.max_seq_len={model.max_seq_len}",
        "activations": f"train.batch_size={train.batch_size}, train.seq_len={train.seq_len}, "
                       f"model.d_model={model.d_model} or model.n_layers={model.n_layers}",
        "logits": f"train.batch_size={train.batch_size}, train.seq_len={train.seq_len} or "
                  f"model.vocab_size={model.vocab_size}",
    }
    return hints[term]

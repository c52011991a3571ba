"""Forward FLOPs per token of `MoETransformerLM`'s blocks, counted by hand formulas, for the compare report.

Counted (2 FLOPs per multiply-add of a weight matmul, per token and block): the attention projections, qkv and out,
4·D² multiply-adds; the feed-forward: a dense SwiGLU 3·D·F (F = dense_d_ff or d_ff), a routed expert 3·D·d_ff per
d_ff-wide expert a token enters (an expert of width w counts w ÷ d_ff; `train.loop.active_expert_units`), shared
experts 3·D·(shared_experts·d_ff). A Mixture-of-Depths block (layers/depth.py) spends its attention, dense and
shared FLOPs only on the tokens it processes; its MoE layer sees only those tokens, so its expert units already
count nothing for the others.

Not counted, for every variant alike: attention scores and weighted values (they grow with the sequence length),
norms, routers and the Mixture-of-Depths predictor (small next to the matmuls above), embeddings and the output
projection (the same for every variant).

Shape legend: D model width.
"""

from __future__ import annotations

from collections.abc import Sequence

from routelab.models.transformer import ModelConfig


def attention_flops(cfg: ModelConfig) -> float:
    """The qkv and out projections of one block, per token."""
    return 2.0 * 4 * cfg.d_model * cfg.d_model


def expert_flops(cfg: ModelConfig) -> float:
    """One d_ff-wide SwiGLU expert on one token."""
    return 2.0 * 3 * cfg.d_model * cfg.d_ff


def block_flops_per_token(
    cfg: ModelConfig, *, processed_by_block: Sequence[float], expert_units_by_moe_layer: Sequence[float]
) -> float:
    """Block FLOPs per token of a forward in which block i processed the fraction `processed_by_block[i]` of the
    tokens and MoE layer j spent `expert_units_by_moe_layer[j]` d_ff-wide expert units per token (over all tokens)."""
    if len(processed_by_block) != cfg.n_layers:
        raise ValueError(f"processed_by_block has {len(processed_by_block)} entries for n_layers={cfg.n_layers}")
    moe_at = cfg.moe_layer_indices()
    if len(expert_units_by_moe_layer) != len(moe_at):
        raise ValueError(f"expert_units_by_moe_layer has {len(expert_units_by_moe_layer)} entries for "
                         f"{len(moe_at)} MoE layers")
    D = cfg.d_model
    dense = 2.0 * 3 * D * (cfg.dense_d_ff or cfg.d_ff)
    shared = 2.0 * 3 * D * cfg.shared_experts * cfg.d_ff
    units = dict(zip(moe_at, expert_units_by_moe_layer))
    total = 0.0
    for i, p in enumerate(processed_by_block):
        ffn = units[i] * expert_flops(cfg) + p * shared if i in units else p * dense
        total += p * attention_flops(cfg) + ffn
    return total


def reference_block_flops_per_token(cfg: ModelConfig, k: int) -> float:
    """The same count for top-k's reference: every block processes every token, each MoE layer k d_ff-wide experts."""
    return block_flops_per_token(cfg, processed_by_block=[1.0] * cfg.n_layers,
                                 expert_units_by_moe_layer=[float(k)] * len(cfg.moe_layer_indices()))

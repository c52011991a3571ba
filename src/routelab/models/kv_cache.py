"""The decode cache of `MoETransformerLM`: attention keys/values and each router's cache, for incremental decoding.

Shape legend: B sequences, L new tokens of this call, S cache slots (filled so far, incl. the new ones), H heads,
Dh head width, K2 = Dh/2 rotary pairs.

B sequences are decoded together, slot by slot: a call with ids [B, L] fills slots [length, length + L) of every
row. A row's slots may be padding (prompts of different lengths are left-padded): padding is never attended to,
never routed, and does not advance the row's rotary position, so each row computes what it would alone.

A Mixture-of-Depths block (`layers/depth.py`) is run only by some tokens: the cache records, per such block, which
slots' tokens ran it (`routed_mask`), and the block's queries see only those slots (a skipped token's slot holds
keys/values that are never attended to, as if it had written none).
"""

from __future__ import annotations

import torch
from torch import Tensor

from routelab.routing.base import RouterCache


class DecodeCache:
    """Keys and values per attention layer ([B, H, capacity, Dh], allocated on first use) and one `RouterCache`
    per MoE layer. Made by `MoETransformerLM.new_cache(batch_size, capacity)`; passed as `forward(..., cache=)`."""

    def __init__(self, *, num_layers: int, num_moe_layers: int, batch_size: int, capacity: int) -> None:
        self.batch_size, self.capacity, self.length = batch_size, capacity, 0
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.routers = [RouterCache() for _ in range(num_moe_layers)]
        self.real_BS = torch.zeros(batch_size, capacity, dtype=torch.bool)
        self.positions_B = torch.zeros(batch_size, dtype=torch.long)  # real tokens seen per row
        self.has_padding = False
        self._start = 0
        self.processed: dict[int, Tensor] = {}  # routed block → [B, capacity] bool: slots whose token ran it

    def begin(self, real_BL: Tensor) -> tuple[Tensor, Tensor | None]:
        """Take the slots of L new tokens (real_BL: False where padding). Returns their rotary positions [B, L] and
        the attention mask [B, 1, L, S] over the filled slots; None when there is nothing to hide beyond the plain
        causal pattern of the L queries over all S slots (one new token, or a first call without padding)."""
        B, L = real_BL.shape
        if B != self.batch_size:
            raise ValueError(f"the decode cache holds {self.batch_size} sequences, got a batch of {B}")
        if self.length + L > self.capacity:
            raise ValueError(f"the decode cache holds {self.capacity} tokens; {self.length} + {L} new do not fit")
        self.real_BS = self.real_BS.to(real_BL.device)
        self.positions_B = self.positions_B.to(real_BL.device)
        start, self._start = self.length, self.length
        self.length += L
        self.real_BS[:, start : self.length] = real_BL
        positions_BL = (self.positions_B[:, None] + real_BL.long().cumsum(1) - 1).clamp_min(0)
        self.positions_B += real_BL.sum(1)
        self.has_padding = self.has_padding or not bool(real_BL.all())
        if not self.has_padding and (L == 1 or start == 0):
            return positions_BL, None
        return positions_BL, self._mask(self.real_BS)

    def routed_mask(self, layer: int, run_BL: Tensor) -> Tensor:
        """Record which of this call's L tokens run block `layer` (run_BL, False for padding) and return that
        block's attention mask [B, 1, L, S]: a query sees the earlier (or same-call, causally) slots whose token ran
        the block, and itself (so a skipped query has a non-empty softmax; its output is discarded)."""
        done_BS = self.processed.get(layer)
        if done_BS is None:
            done_BS = self.processed[layer] = torch.zeros(self.batch_size, self.capacity, dtype=torch.bool, device=run_BL.device)
        done_BS[:, self._start : self.length] = run_BL & self.real_BS[:, self._start : self.length]
        return self._mask(done_BS)

    def _mask(self, visible_BS: Tensor) -> Tensor:
        """[B, 1, L, S]: each of this call's queries sees the filled slots at or before its own that are visible
        (visible_BS), and itself, so that a query on a hidden slot (padding, a skipped token) has a non-empty softmax
        (its output is never used)."""
        S = self.length
        slot_S = torch.arange(S, device=visible_BS.device)
        query_L = torch.arange(self._start, S, device=visible_BS.device)
        causal_LS = slot_S[None, :] <= query_L[:, None]
        allowed_BLS = (visible_BS[:, None, :S] & causal_LS) | (slot_S[None, :] == query_L[:, None])
        return allowed_BLS[:, None]

    def store(self, layer: int, k_BHLD: Tensor, v_BHLD: Tensor) -> tuple[Tensor, Tensor]:
        """Write this call's keys/values of block `layer`; returns the keys/values of every filled slot."""
        if self.keys[layer] is None:
            B, H, _, Dh = k_BHLD.shape
            self.keys[layer] = k_BHLD.new_zeros(B, H, self.capacity, Dh)
            self.values[layer] = v_BHLD.new_zeros(B, H, self.capacity, Dh)
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, self._start : self.length] = k_BHLD
        values[:, :, self._start : self.length] = v_BHLD
        return keys[:, :, : self.length], values[:, :, : self.length]

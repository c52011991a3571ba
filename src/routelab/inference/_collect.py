"""Running a model over calibration text and reading its MoE layers' decisions (shared by calibrate, prune, merge,
analysis and sweep).

`data` everywhere in routelab.inference is token ids: a LongTensor [N, L] (split into batches here) or an iterable
of LongTensor [B, L] batches. Models are routelab LMs (`forward(ids) -> (logits, loss)`) or Hugging Face causal LMs
(`forward(input_ids=ids).logits`), after `patch_model`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn


def batches(data: Tensor | Iterable[Tensor], batch_size: int = 16) -> Iterator[Tensor]:
    """LongTensor [B, L] batches of `data` (see the module docstring)."""
    if isinstance(data, Tensor):
        if data.dim() != 2 or data.dtype != torch.long:
            raise ValueError(f"data must be token ids, a LongTensor [N, L], got {data.dtype} {tuple(data.shape)}")
        if data.shape[0] == 0 or data.shape[1] == 0:
            raise ValueError(f"data is empty (shape {tuple(data.shape)})")
        yield from data.split(batch_size)
        return
    any_batch = False
    for batch in data:
        if not isinstance(batch, Tensor) or batch.dim() != 2 or batch.dtype != torch.long:
            raise ValueError("data must be a LongTensor [N, L] of token ids or an iterable of LongTensor [B, L] batches")
        any_batch = True
        yield batch
    if not any_batch:
        raise ValueError("data holds no batches")


def lm_logits(model: nn.Module, ids_BL: Tensor) -> Tensor:
    """Next-token logits [B, L, V] of a routelab LM or a Hugging Face causal LM."""
    from routelab.models.transformer import MoETransformerLM

    param = next(model.parameters(), None)
    if param is not None and ids_BL.device != param.device:
        ids_BL = ids_BL.to(param.device)
    if isinstance(model, MoETransformerLM):
        return model(ids_BL)[0]
    out = model(input_ids=ids_BL)
    return out.logits if hasattr(out, "logits") else out[0]


def token_losses(model: nn.Module, ids_BL: Tensor) -> Tensor:
    """Next-token cross-entropy [B, L-1] (position t predicts token t+1), in fp32."""
    logits_BLV = lm_logits(model, ids_BL)[:, :-1].float()
    targets = ids_BL[:, 1:].to(logits_BLV.device)
    return torch.nn.functional.cross_entropy(
        logits_BLV.reshape(-1, logits_BLV.shape[-1]), targets.reshape(-1), reduction="none"
    ).view(ids_BL.shape[0], -1)


@torch.no_grad()
def routing_statistics(
    model: nn.Module, data: Tensor | Iterable[Tensor], *, batch_size: int = 16, gram: bool = False
) -> list[dict[str, Tensor]]:
    """Per MoE layer, over `data` in eval mode: "count" [E] assignments per expert, "weight" [E] the sum of their
    routing weights, "tokens" (0-d) tokens routed, and with `gram` the router-logit Gram matrix "gram" [E, E]
    (Σ_t z_t z_tᵀ: column cosines without keeping every logit). All float64."""
    from routelab.inference.override import moe_layers

    layers = moe_layers(model)
    stats = []
    for layer in layers:
        E = layer.router.num_experts
        s = {"count": torch.zeros(E, dtype=torch.float64), "weight": torch.zeros(E, dtype=torch.float64),
             "tokens": torch.zeros((), dtype=torch.float64)}
        if gram:
            s["gram"] = torch.zeros(E, E, dtype=torch.float64)
        stats.append(s)
    was_training = model.training
    model.eval()
    try:
        for ids in batches(data, batch_size):
            lm_logits(model, ids)
            for layer, s in zip(layers, stats):
                d = layer.last_decision
                E = d.num_experts
                s["count"] += torch.bincount(d.expert_index, minlength=E).double().cpu()
                s["weight"] += torch.zeros(E, dtype=torch.float64).index_add(
                    0, d.expert_index.cpu(), d.weight.detach().double().cpu())
                s["tokens"] += d.num_tokens
                if gram:
                    if d.router_logits is None:
                        raise ValueError("this router records no logits (RoutingDecision.router_logits)")
                    z_TE = d.router_logits[:, :E].double().cpu()
                    s["gram"] += z_TE.T @ z_TE
    finally:
        model.train(was_training)
    return stats

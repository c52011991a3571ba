"""Quality against compute for inference-time routing settings (what `routelab sweep` writes): the standard evaluation
of inference-time routing papers (Harder Tasks Need More Experts, NAEE, MoDES).

For each setting — the trained routing, then each k, top-p, min-weight-ratio (NAEE) and skip fraction (MoDES,
`calibrate_skipping` on the calibration windows) — the model runs every domain's windows under `override_routing`
and reports the perplexity per domain and overall (token-weighted), the mean routed experts per token per MoE layer,
and the active expert FLOPs per token relative to the trained setting (every expert of a layer has the same width,
so this is the ratio of assignments; router FLOPs are not counted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from routelab.inference._collect import batches, token_losses
from routelab.inference.calibrate import calibrate_skipping
from routelab.inference.override import RoutingOverride, moe_layers, override_routing, score_rule

__all__ = ["evaluate_routing", "sweep", "write_sweep"]

KINDS = ("trained", "k", "top_p", "min_weight_ratio", "skip")
OUTPUTS = ("report.md", "sweep.json", "sweep.png")  # every file write_sweep writes


@torch.no_grad()
def evaluate_routing(model: nn.Module, domains: dict[str, Tensor], *, batch_size: int = 16) -> dict[str, Any]:
    """Perplexity per domain and overall, and experts per token per MoE layer, under the model's current routing."""
    layers = moe_layers(model)
    was_training = model.training
    model.eval()
    by_domain, total_loss, total_tokens = {}, 0.0, 0
    assignments, routed = 0, 0
    try:
        for name, ids in domains.items():
            loss, n = 0.0, 0
            for batch in batches(ids, batch_size):
                losses = token_losses(model, batch)
                loss += float(losses.double().sum())
                n += losses.numel()
                assignments += sum(layer.last_decision.num_assignments for layer in layers)
                routed += batch.numel() * len(layers)
            by_domain[name] = math.exp(loss / n)
            total_loss += loss
            total_tokens += n
    finally:
        model.train(was_training)
    return {"ppl": math.exp(total_loss / total_tokens), "ppl_by_domain": by_domain,
            "experts_per_token": assignments / routed}


def sweep(
    model: nn.Module,
    domains: dict[str, Tensor],
    *,
    k: Sequence[int] = (),
    top_p: Sequence[float] = (),
    min_weight_ratio: Sequence[float] = (),
    skip: Sequence[float] = (),
    calibration: Tensor | None = None,
    batch_size: int = 16,
    log=None,
) -> dict[str, Any]:
    """Evaluate the trained routing and every given setting on `domains` ({name: token ids [N, L]}).

    `calibration` (token ids [N, L]) calibrates the skip settings; default: the evaluation windows themselves.
    Every option value is validated (by `override_routing` / `calibrate_skipping`) before any evaluation runs.
    Returns {"rows": [{"kind", "value", "ppl", "ppl_by_domain", "experts_per_token", "active_flops"}], ...}.
    """
    if not domains:
        raise ValueError("domains must name at least one {name: token ids [N, L]}")
    settings: list[tuple[str, Any]] = [("trained", None)]
    settings += [("k", v) for v in k] + [("top_p", v) for v in top_p]
    settings += [("min_weight_ratio", v) for v in min_weight_ratio] + [("skip", v) for v in skip]
    for kind, value in settings[1:]:  # validate everything first: an override that is removed at once
        if kind == "skip":
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
                raise ValueError(f"skip values must be numbers in [0, 1), got {value!r}")
            for i, layer in enumerate(moe_layers(model)):
                score_rule(layer.router, where=f"layer {i}'s router")
        else:
            override_routing(model, **{kind: value}).remove()
    calib = calibration if calibration is not None else torch.cat(list(domains.values()))
    rows = []
    for kind, value in settings:
        if log is not None:
            log(f"sweep: {kind}" + ("" if value is None else f"={value}"))
        handle: RoutingOverride | None = None
        if kind == "skip":
            handle = calibrate_skipping(model, calib, value, batch_size=batch_size)
        elif kind != "trained":
            handle = override_routing(model, **{kind: value})
        try:
            result = evaluate_routing(model, domains, batch_size=batch_size)
        finally:
            if handle is not None:
                handle.remove()
        row = {"kind": kind, "value": value, **result}
        if handle is not None and handle.info:
            row["calibration"] = handle.info
        rows.append(row)
    base = rows[0]["experts_per_token"]
    for row in rows:
        row["active_flops"] = row["experts_per_token"] / base if base else float("nan")
    return {"domains": list(domains), "rows": rows,
            "tokens_per_domain": {d: int(ids.numel()) for d, ids in domains.items()}}


def _label(row: dict[str, Any]) -> str:
    return "trained" if row["kind"] == "trained" else f"{row['kind']}={row['value']}"


def write_sweep(result: dict[str, Any], out: str | Path, *, title: str = "routelab sweep") -> list[Path]:
    """Write report.md, sweep.json and sweep.png into `out` (created); returns the files written."""
    import json

    from routelab._atomic import atomic_write_text
    from routelab.inference.analysis import _figure, _save

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, names = result["rows"], result["domains"]
    fig = _figure((6.5, 4.2))
    ax = fig.add_subplot()
    for kind in KINDS:
        pts = sorted((r["active_flops"], r["ppl"], r) for r in rows if r["kind"] == kind)
        if not pts:
            continue
        marker = "*" if kind == "trained" else "o"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, markersize=12 if kind == "trained" else 5,
                label=kind)
        for x, y, r in pts:
            if kind != "trained":
                ax.annotate(str(r["value"]), (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("active expert FLOPs per token (× trained)")
    ax.set_ylabel("perplexity (all domains)")
    ax.set_title("quality against compute")
    ax.legend()
    plot = _save(fig, out / "sweep.png")
    lines = [f"# {title}", "", "Tokens per domain: " + ", ".join(
        f"**{d}** {result['tokens_per_domain'][d]:,}" for d in names) + ".", "",
        "| setting | experts/token | active FLOPs (× trained) | ppl | " + " | ".join(f"ppl {d}" for d in names) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(names)]
    for r in rows:
        lines.append(f"| {_label(r)} | {r['experts_per_token']:.3f} | {r['active_flops']:.3f} | {r['ppl']:.3f} | "
                     + " | ".join(f"{r['ppl_by_domain'][d]:.3f}" for d in names) + " |")
    lines += ["", "- **experts/token**: mean routed experts per token per MoE layer; **active FLOPs**: routed-expert "
              "FLOPs per token relative to the trained routing (router compute not counted).",
              "- **k**: top-k over the router's own scores; **top_p**: the shortest prefix of experts whose mass reaches "
              "p; **min_weight_ratio**: drop an expert whose weight is below β × the token's largest (NAEE); "
              "**skip**: MoDES-style skipping calibrated to skip that fraction of assignments on the calibration text.",
              "", "![quality against compute](sweep.png)", ""]
    atomic_write_text(out / "sweep.json", json.dumps(result, indent=1, allow_nan=True))
    atomic_write_text(out / "report.md", "\n".join(lines))
    return [plot, out / "sweep.json", out / "report.md"]

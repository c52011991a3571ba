"""Reading a trained model's routing on text, per layer and per domain (what `routelab analyze` writes).

Papers whose measures this reports: Three Phases of Expert Routing (load, entropy and congestion per layer);
Multilingual Routing in Mixture-of-Experts (each domain's expert distribution per layer and the cosine similarity of
those distributions across domains); Not All Models Suit Expert Offloading (local routing consistency, SRP and SCH,
see `routelab.inference.consistency`).

Per MoE layer, over all domains' windows (eval mode, the model's own routing or whatever override is active):
    load            assignments per expert, and as a share of all assignments
    load_entropy    entropy of the load shares ÷ ln E (1 = uniform use)
    token_entropy   mean over tokens of the entropy of softmax(router logits) (nats): how sure the router is
    max_over_mean   busiest expert's load ÷ mean load; cv: std ÷ mean of the loads
    congestion      fraction of tokens whose top-1 expert (largest weight) is the layer's most loaded expert
    domain_share    per domain, each expert's share of that domain's assignments
    domain_cosine   [D, D] cosine similarity of the domains' share vectors
    srp[m], sch[m]  local routing consistency at segment length m (SCH with a cache of `cache_size` experts, by
                    default twice the layer's mean experts per token, at most E); windows never cross sequences
    top_tokens      per expert, the token ids (decoded when a tokenizer is given) most often routed to it
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from routelab.inference._collect import batches, lm_logits
from routelab.inference.consistency import sch, srp, usage_from_decision
from routelab.inference.override import moe_layers

__all__ = ["analyze", "write_analysis"]

SEGMENT_LENGTHS = (1, 4, 16, 64)


@torch.no_grad()
def analyze(
    model: nn.Module,
    domains: dict[str, Tensor],
    *,
    tokenizer: Any = None,
    batch_size: int = 16,
    segment_lengths: Sequence[int] = SEGMENT_LENGTHS,
    cache_size: int | None = None,
    top_tokens: int = 8,
) -> dict[str, Any]:
    """Routing statistics of `model` on `domains` ({name: token ids [N, L]}); a JSON-ready dict (see the module
    docstring for every field)."""
    if not domains:
        raise ValueError("domains must name at least one {name: token ids [N, L]}")
    for m in segment_lengths:
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"segment_lengths must be integers >= 1, got {m!r}")
    layers = moe_layers(model)
    names = list(domains)
    n_layers = len(layers)
    Es = [layer.router.num_experts for layer in layers]
    load = {d: [torch.zeros(E, dtype=torch.float64) for E in Es] for d in names}
    entropy_sum = [0.0] * n_layers
    top1 = [torch.zeros(E, dtype=torch.float64) for E in Es]  # top-1 counts per expert, for congestion
    usage: list[list[Tensor]] = [[] for _ in layers]
    token_counts: list[dict[int, dict[int, int]]] = [{} for _ in layers]
    n_tokens = 0
    was_training = model.training
    model.eval()
    try:
        for name in names:
            for ids in batches(domains[name], batch_size):
                lm_logits(model, ids)
                n_tokens += ids.numel()
                flat_ids = ids.reshape(-1)
                for j, layer in enumerate(layers):
                    d = _cpu(layer.last_decision)
                    E = Es[j]
                    load[name][j] += torch.bincount(d.expert_index, minlength=E).double()
                    if d.router_logits is not None:
                        p = d.router_logits.double().softmax(-1)
                        entropy_sum[j] += float(torch.special.entr(p).sum())
                    if d.num_assignments:
                        dense = d.dense_weights().detach()
                        has = dense.abs().sum(-1) > 0
                        top1[j] += torch.bincount(dense[has].argmax(-1), minlength=E).double()
                    usage[j].extend(usage_from_decision(d, tuple(ids.shape)))
                    for e, tok in zip(d.expert_index.tolist(), flat_ids[d.token_index].tolist()):
                        counts = token_counts[j].setdefault(e, {})
                        counts[tok] = counts.get(tok, 0) + 1
    finally:
        model.train(was_training)

    out_layers = []
    for j in range(n_layers):
        E = Es[j]
        total_E = sum(load[d][j] for d in names)
        assignments = float(total_E.sum())
        share_E = total_E / assignments if assignments else total_E
        mean = float(total_E.mean())
        ept = assignments / n_tokens
        c = cache_size if cache_size is not None else min(E, max(1, round(2 * ept)))
        shares = {d: (load[d][j] / load[d][j].sum().clamp_min(1)).tolist() for d in names}
        vecs = torch.tensor([shares[d] for d in names], dtype=torch.float64)
        unit = vecs / vecs.norm(dim=1, keepdim=True).clamp_min(1e-300)
        top_expert = int(torch.argmax(total_E))
        n_top1 = float(top1[j].sum())
        experts_tokens = []
        for e in range(E):
            ranked = sorted(token_counts[j].get(e, {}).items(), key=lambda kv: (-kv[1], kv[0]))[:top_tokens]
            experts_tokens.append([
                {"id": tok, "count": n, **({"text": tokenizer.decode([tok])} if tokenizer is not None else {})}
                for tok, n in ranked
            ])
        out_layers.append({
            "layer": j,
            "num_experts": E,
            "experts_per_token": ept,
            "load": total_E.tolist(),
            "load_share": share_E.tolist(),
            "load_entropy": float(torch.special.entr(share_E).sum() / math.log(E)) if E > 1 else 1.0,
            "token_entropy": entropy_sum[j] / n_tokens,
            "max_over_mean": float(total_E.max()) / mean if mean else float("nan"),
            "cv": float(total_E.std(unbiased=False)) / mean if mean else float("nan"),
            "congestion": float(top1[j][top_expert]) / n_top1 if n_top1 else float("nan"),
            "most_loaded_expert": top_expert,
            "domain_share": shares,
            "domain_cosine": (unit @ unit.T).tolist(),
            "cache_size": c,
            "srp": {str(m): srp(usage[j], m) for m in segment_lengths},
            "sch": {str(m): sch(usage[j], m, c) for m in segment_lengths},
            "top_tokens": experts_tokens,
        })
    return {"domains": names, "tokens": n_tokens, "segment_lengths": list(segment_lengths),
            "tokens_per_domain": {d: int(domains[d].numel()) for d in names}, "layers": out_layers}


def _cpu(decision):
    """The decision's tensors on the CPU (statistics are accumulated there, whatever device the model runs on)."""
    import dataclasses

    logits = None if decision.router_logits is None else decision.router_logits.cpu()
    return dataclasses.replace(decision, token_index=decision.token_index.cpu(),
                               expert_index=decision.expert_index.cpu(), weight=decision.weight.cpu(),
                               router_logits=logits)


# -- the report folder -----------------------------------------------------------------------------------------

PLOTS = {"load": "expert_load.png", "domains": "domain_share.png", "similarity": "domain_similarity.png",
         "consistency": "consistency.png"}
OUTPUTS = ("report.md", "analysis.json", *PLOTS.values())  # every file write_analysis may write


def write_analysis(result: dict[str, Any], out: str | Path, *, title: str = "routelab analyze") -> list[Path]:
    """Write report.md, analysis.json and the PNG plots into `out` (created); returns the files written."""
    import json

    from routelab._atomic import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [_plot_load(result, out / PLOTS["load"]), _plot_consistency(result, out / PLOTS["consistency"])]
    if len(result["domains"]) > 1:
        written += [_plot_domains(result, out / PLOTS["domains"]), _plot_similarity(result, out / PLOTS["similarity"])]
    atomic_write_text(out / "analysis.json", json.dumps(result, indent=1, allow_nan=True))
    atomic_write_text(out / "report.md", _markdown(result, title, [p.name for p in written]))
    return written + [out / "analysis.json", out / "report.md"]


def _f(x: float, digits: int = 3) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _markdown(result: dict[str, Any], title: str, plots: list[str]) -> str:
    layers, ms, names = result["layers"], result["segment_lengths"], result["domains"]
    lines = [f"# {title}", "", f"{result['tokens']:,} tokens: " + ", ".join(
        f"**{d}** {result['tokens_per_domain'][d]:,}" for d in names) + ".", "",
        "## Per layer", "",
        "| layer | experts/token | load entropy | token entropy (nats) | max/mean | CV | congestion |",
        "|---:|---:|---:|---:|---:|---:|---:|"]
    for L in layers:
        lines.append(f"| {L['layer']} | {_f(L['experts_per_token'], 2)} | {_f(L['load_entropy'])} "
                     f"| {_f(L['token_entropy'])} | {_f(L['max_over_mean'], 2)} | {_f(L['cv'])} "
                     f"| {_f(L['congestion'])} (expert {L['most_loaded_expert']}) |")
    lines += ["", "- **load entropy**: entropy of the experts' shares of all assignments ÷ ln E (1 = uniform use); "
              "**token entropy**: mean entropy of each token's router softmax; **congestion**: fraction of tokens "
              "whose top-1 expert is the layer's most loaded expert.", "",
              "## Local routing consistency (SRP, SCH)", "",
              "| layer | cache | " + " | ".join(f"SRP m={m}" for m in ms) + " | " +
              " | ".join(f"SCH m={m}" for m in ms) + " |", "|---:|---:|" + "---:|" * (2 * len(ms))]
    for L in layers:
        lines.append(f"| {L['layer']} | {L['cache_size']} | " + " | ".join(_f(L["srp"][str(m)]) for m in ms) + " | "
                     + " | ".join(_f(L["sch"][str(m)]) for m in ms) + " |")
    lines += ["", "SRP(m): best F1 of predicting that the experts used at least j times in a segment of m tokens serve "
              "every token of it (1 = routing constant within segments). SCH(m): hit rate of a cache of `cache` "
              "experts per layer that holds the experts most used in the next m tokens (an expert's first use "
              "misses). *Not All Models Suit Expert Offloading* (Liang et al., 2025)."]
    if len(names) > 1:
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
        lines += ["", "## Cross-domain routing similarity", "",
                  "| layer | " + " | ".join(f"{a} vs {b}" for a, b in pairs) + " |", "|---:|" + "---:|" * len(pairs)]
        for L in layers:
            cos = L["domain_cosine"]
            lines.append(f"| {L['layer']} | " + " | ".join(
                _f(cos[names.index(a)][names.index(b)]) for a, b in pairs) + " |")
        lines += ["", "Cosine similarity of the domains' expert-share vectors per layer (*Multilingual Routing in "
                  "Mixture-of-Experts*); 1 = the domains use the experts in the same proportions."]
        lines += ["", "## Expert share per domain", "", "| layer | expert | " + " | ".join(names) + " |",
                  "|---:|---:|" + "---:|" * len(names)]
        for L in layers:
            for e in range(L["num_experts"]):
                lines.append(f"| {L['layer']} | {e} | " + " | ".join(
                    f"{L['domain_share'][d][e]:.3f}" for d in names) + " |")
    lines += ["", "## Tokens most often routed to each expert", "", "| layer | expert | tokens (count) |", "|---:|---:|---|"]
    for L in layers:
        for e, toks in enumerate(L["top_tokens"]):
            shown = ", ".join(f"`{_show(t.get('text', str(t['id'])))}` ({t['count']})" for t in toks)
            lines.append(f"| {L['layer']} | {e} | {shown} |")
    for name in plots:
        lines += ["", f"![{name}]({name})"]
    lines.append("")
    return "\n".join(lines)


def _show(text: str) -> str:
    return text.replace("\n", "\\n").replace("|", "\\|").replace("`", "'") or "∅"


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    import io

    from routelab._atomic import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _plot_load(result: dict[str, Any], path: Path) -> Path:
    layers = result["layers"]
    E = max(L["num_experts"] for L in layers)
    grid = [[(L["load_share"][e] * L["num_experts"]) if e < L["num_experts"] else float("nan") for e in range(E)]
            for L in layers]
    fig = _figure((1.2 + 0.45 * E, 1.0 + 0.45 * len(layers)))
    ax = fig.add_subplot()
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title("expert load ÷ mean load")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def _plot_domains(result: dict[str, Any], path: Path) -> Path:
    names, layers = result["domains"], result["layers"]
    E = max(L["num_experts"] for L in layers)
    fig = _figure((1.5 + 3.2 * len(names), 1.2 + 0.45 * len(layers)))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, d in zip(axes, names):
        grid = [[L["domain_share"][d][e] if e < L["num_experts"] else float("nan") for e in range(E)] for L in layers]
        im = ax.imshow(grid, cmap="magma", aspect="auto", vmin=0)
        ax.set_title(f"{d}: expert share")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        fig.colorbar(im, ax=ax)
    return _save(fig, path)


def _plot_similarity(result: dict[str, Any], path: Path) -> Path:
    names, layers = result["domains"], result["layers"]
    fig = _figure((1.0 + 2.4 * len(layers), 2.8))
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for ax, L in zip(axes, layers):
        im = ax.imshow(L["domain_cosine"], cmap="coolwarm", vmin=0, vmax=1)
        ax.set_title(f"layer {L['layer']}")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
    fig.colorbar(im, ax=list(axes))
    return _save(fig, path)


def _plot_consistency(result: dict[str, Any], path: Path) -> Path:
    ms = result["segment_lengths"]
    fig = _figure((8, 3.2))
    ax_srp, ax_sch = fig.subplots(1, 2)
    for L in result["layers"]:
        ax_srp.plot(ms, [L["srp"][str(m)] for m in ms], marker="o", label=f"layer {L['layer']}")
        ax_sch.plot(ms, [L["sch"][str(m)] for m in ms], marker="o", label=f"layer {L['layer']} (c={L['cache_size']})")
    for ax, name in ((ax_srp, "SRP"), (ax_sch, "SCH")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("segment length m")
        ax.set_ylabel(name)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    return _save(fig, path)


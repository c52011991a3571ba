"""The report folder: report.md (the side-by-side table), PNG plots, results.json and config.yaml beside it."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from routelab._atomic import atomic_write_bytes, atomic_write_text

PLOTS = {
    "val_loss": "val_loss.png",
    "expert_load": "expert_load.png",
    "experts_per_token": "experts_per_token.png",
    "domain_load": "domain_load.png",
    "quality_vs_compute": "quality_vs_compute.png",
}


def write_report(summary: dict[str, Any], out: Path) -> list[Path]:
    """Write the plots and report.md into `out`; returns the files written."""
    ok = [v for v in summary["variants"] if "error" not in v]
    written = []
    if ok:
        written.append(plot_val_loss(ok, out / PLOTS["val_loss"]))
        written.append(plot_expert_load(ok, out / PLOTS["expert_load"]))
        written.append(plot_experts_per_token(ok, out / PLOTS["experts_per_token"]))
        if len(summary["data"]["domains"]) > 1:
            written.append(plot_domain_load(ok, out / PLOTS["domain_load"]))
        written.append(plot_quality_vs_compute(ok, out / PLOTS["quality_vs_compute"]))
    atomic_write_text(out / "report.md", render_markdown(summary, [p.name for p in written]))
    return written + [out / "report.md"]


def causal_label(v: dict[str, Any]) -> str:
    if v.get("model_kind") == "diffusion_lm":  # bidirectional model: causality does not decide comparability
        return "n/a (diffusion)"
    if v["causal_eval"] and v["causal_train"]:
        return "yes"
    if v["causal_eval"]:
        return "eval only"
    return "**no** ⚠"


def describe_options(v: dict[str, Any]) -> str:
    parts = [f"{k}={val}" for k, val in (v.get("options") or {}).items()]
    if v.get("k_schedule"):
        s = v["k_schedule"]
        ks = [o.get("k", o.get("max_k")) for o in v.get("per_layer_options", [])]
        parts.append(f"k_schedule={s.get('shape')} (k per layer {ks})")
    parts += [f"model.{k}={val}" for k, val in (v.get("model") or {}).items()]
    return ", ".join(parts) or "defaults"


def render_markdown(summary: dict[str, Any], plots: list[str]) -> str:
    cfg = summary["config"]
    m, t = cfg["model"], cfg["train"]
    variants = summary["variants"]
    ok = [v for v in variants if "error" not in v]
    tokens = t["steps"] * t["batch_size"] * t["seq_len"]
    diffusion = m.get("kind", "lm") == "diffusion_lm"
    what = "masked-diffusion MoE LM (bidirectional attention)" if diffusion else "decoder-only MoE LM"
    lines = [
        "# routelab compare",
        "",
        f"{cfg.get('description', '')}".strip(),
        "",
        f"Every variant trains the same {what} (d_model {m['d_model']}, {m['n_layers']} layers, "
        f"{m['n_heads']} heads, {m['num_experts']} experts of width {m['d_ff']}, MoE every {m['moe_every']} layer(s), "
        f"{m['shared_experts']} shared experts, vocabulary {summary['data']['vocab_size']}) with seed {t['seed']}, the "
        f"same batches in the same order: {t['steps']} steps × {t['batch_size']} × {t['seq_len']} = {tokens:,} "
        f"training tokens, AdamW lr {t['lr']} (warm-up {t['warmup']}, cosine).",
        "",
        "Data: " + "; ".join(f"**{d['name']}** — {d['train_tokens']:,} train / {d['val_tokens']:,} validation tokens "
                             f"({d['source']})" for d in summary["data"]["domains"]) + ".",
        "",
        "| variant | router (options) | causal | val ppl | val loss | experts/token | expert FLOPs vs top-k "
        "| block FLOPs vs top-k | imbalance max/mean | imbalance CV | dropped | train tok/s | wall (s) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    seeds = summary.get("seeds") or [t["seed"]]
    if len(seeds) > 1:
        lines[-6] = lines[-6].replace(f"with seed {t['seed']}", f"with seeds {', '.join(map(str, seeds))}")
        lines[-2:] = seeds_table(variants, seeds)
    for v in variants if len(seeds) == 1 else ():
        if "error" in v:
            lines.append(f"| {v['name']} | `{v['router']}` ({describe_options(v)}) | – | failed "
                         f"| – | – | – | – | – | – | – | – | {v['wall_seconds']:.1f} |")
            continue
        lines.append(
            f"| {v['name']} | `{v['router']}` ({describe_options(v)}) | {causal_label(v)} "
            f"| {_f(v['val_perplexity'], 2)} | {_f(v['val_loss'], 4)} | {_f(v['mean_experts_per_token'], 2)} "
            f"| {_f(v['active_expert_flops_vs_topk'], 2)}× | {_f(v.get('active_block_flops_vs_topk'), 2)}× "
            f"| {_f(v['imbalance_max_over_mean'], 2)} | {_f(v['imbalance_cv'], 3)} | {v['dropped_fraction']:.1%} "
            f"| {v['train_tokens_per_second']:,.0f} | {v['wall_seconds']:.1f} |"
        )
    lines += [
        "",
        "How to read it:",
    ]
    if not diffusion:
        lines.append(
            "- **causal**: does a token's routing depend only on itself and earlier tokens? A non-causal router (⚠) "
            "sees later tokens of its batch when routing, so its perplexity in an autoregressive model is **not "
            "comparable** with the others (it can leak the future). \"eval only\": causal when evaluating, "
            "batch-coupled in training.")
    lines += [
        f"- **experts/token**: mean routed experts per token per MoE layer on the validation set; **expert FLOPs vs "
        f"top-k**: active routed-expert FLOPs per token relative to top-{cfg.get('reference_k', 2)} (with all "
        "experts of width d_ff this is experts/token ÷ k; an expert of another width counts width ÷ d_ff, a "
        "Chain-of-Experts layer counts every iteration, a null expert or a skip counts 0; a token that skips a "
        "Mixture-of-Depths block spends nothing there). **block FLOPs vs top-k**: the weight-matmul FLOPs per token "
        "of every block (attention projections 4·D², feed-forward: dense, shared and routed experts as above) that "
        "the token actually ran, relative to top-k running every block (`models/flops.py`; attention scores, "
        "norms, routers, embeddings and the output projection are not counted). It differs from the expert "
        "column's ratio because attention and dense layers are counted too; it is the x-axis of the "
        "quality-vs-compute plot.",
        "- **imbalance**: per MoE layer and validation batch, the busiest expert's load over the mean load (1.0 = "
        "perfectly balanced) and the coefficient of variation of the loads, averaged over batches and layers.",
        "- **dropped**: fraction of selected assignments dropped for capacity. **train tok/s** excludes evaluation; "
        "**wall** includes it. Timings depend on the machine and its load; compare them within one report only.",
    ]
    if diffusion:
        lines += diffusion_section(ok, cfg.get("reference_k", 2))

    if len(seeds) == 1:
        lines.append("- One seed per variant: small differences in perplexity (a few percent at this scale) can be seed "
                     "noise; run with `--seeds 3` or more before drawing conclusions. Router compute is not in the "
                     "FLOPs columns.")
    else:
        ref = variants[0]["name"]
        lines += [
            f"- {len(seeds)} seeds per variant (seed s gives every variant the same initialisation RNG and the same "
            "batches). **val ppl**: mean over seeds ± the half-width of the two-sided 95% Student-t interval "
            f"(t with {len(seeds) - 1} degrees of freedom). **Δ loss vs {ref}**: the mean over seeds of the paired "
            f"difference val_loss(variant, s) − val_loss({ref}, s) in nats/token, with its 95% t-interval; "
            "**real?** says *yes* when the interval excludes 0, *no* (not distinguishable from zero) otherwise. "
            "The other columns are means over seeds; plots of loads and curves show the first seed. Router compute "
            "is not in the FLOPs columns.",
        ]
    lines += mod_section(ok, m)
    if len(summary["data"]["domains"]) > 1 and ok:
        names = [d["name"] for d in summary["data"]["domains"]]
        lines += ["", "Validation loss per domain:", "",
                  "| variant | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for v in ok:
            lines.append(f"| {v['name']} | " + " | ".join(_f(v["val_loss_by_domain"][n], 4) for n in names) + " |")
    failed = [v for v in variants if "error" in v]
    if failed:
        lines += ["", "Failed variants:", ""] + [f"- {v['name']}: `{v['error']}`" for v in failed]
    if summary.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in summary["notes"]]
    captions = {
        PLOTS["val_loss"]: "Validation loss during training",
        PLOTS["expert_load"]: "Expert load per MoE layer (load ÷ mean load; 1 = balanced)",
        PLOTS["experts_per_token"]: "Experts per token (all MoE layers, validation set)",
        PLOTS["domain_load"]: "Share of each domain's assignments per expert, per MoE layer",
        PLOTS["quality_vs_compute"]: "Validation perplexity against active block FLOPs per token",
    }
    for name in plots:
        lines += ["", f"## {captions.get(name, name)}", "", f"![{captions.get(name, name)}]({name})"]
    env = summary["environment"]
    lines += ["", f"Python {env['python']}, torch {env['torch']}, {env['threads']} threads, {env['platform']}. "
              f"Total wall time {summary['wall_seconds']:.0f} s (data and tokenizer {summary['setup_seconds']:.1f} s). "
              "The exact configuration is in `config.yaml`; every number and curve in `results.json`.", ""]
    return "\n".join(lines)


def mod_section(variants: list[dict[str, Any]], model: dict[str, Any]) -> list[str]:
    """Report lines for the variants with Mixture-of-Depths blocks: per routed block and seed, the share of
    validation tokens the causal predictor let through and how often it agreed with top-C membership."""
    rows = []
    for v in variants:
        runs = v.get("runs") or [v]
        capacity = {**model, **(v.get("model") or {})}.get("mod_capacity")
        if capacity is None or not runs[0].get("mod_predictor_accuracy") or "mod_blocks" not in runs[0]:
            continue  # (a result stored before these fields existed has nothing to show here)
        processed = [r["processed_fraction_by_block"] for r in runs]
        for n, i in enumerate(runs[0]["mod_blocks"]):
            rows.append(f"| {v['name']} | {i} | {capacity} | " + ", ".join(_f(p[i], 2) for p in processed)
                        + " | " + ", ".join(_f(r["mod_predictor_accuracy"][n], 2) for r in runs) + " |")
    if not rows:
        return []
    return ["", "Mixture-of-Depths blocks: in training each routed block processes the top ⌈capacity·L⌉ tokens of "
            "every sequence; in evaluation (as in generation) a causal predictor decides per token. Per seed: the "
            "share of validation tokens it let through, and how often it agreed with top-C membership.", "",
            "| variant | block | capacity (training) | processed in evaluation | predictor agrees with top-C |",
            "|---|---:|---:|---|---|"] + rows


def diffusion_section(variants: list[dict[str, Any]], reference_k: int) -> list[str]:
    """Report lines of a `model.kind: diffusion_lm` comparison: what its loss is, and active FLOPs per bin of t."""
    lines = [
        "- **diffusion LM**: val loss is the NELBO per token of the masked-diffusion objective (linear schedule, "
        "fixed validation times and masks), val ppl = exp(NELBO): an **upper bound** on perplexity, not comparable "
        "with an autoregressive model's perplexity. Attention is bidirectional and nothing is generated left to "
        "right, so non-causal routers (expert choice) are fully comparable here (the causal column reads n/a).",
    ]
    bins = [(b["t_lo"], b["t_hi"]) for b in variants[0].get("flops_by_t", [])] if variants else []
    if not bins:
        return lines
    lines += ["", f"Active expert FLOPs per token vs top-{reference_k}, by diffusion time t (mask ratio) of the "
              "validation sequences:", "",
              "| variant | " + " | ".join(f"t ∈ [{lo:.1f}, {hi:.1f})" for lo, hi in bins) + " |",
              "|---|" + "---:|" * len(bins)]
    for v in variants:
        by_bin = {(b["t_lo"], b["t_hi"]): b["flops_vs_topk"] for b in v.get("flops_by_t", [])}
        lines.append(f"| {v['name']} | " + " | ".join(
            f"{_f(by_bin[b], 2)}×" if b in by_bin else "–" for b in bins) + " |")
    return lines


def seeds_table(variants: list[dict[str, Any]], seeds: list[int]) -> list[str]:
    """The main table of a multi-seed comparison (header included)."""
    ref = variants[0]["name"]
    lines = [
        f"| variant | router (options) | causal | val ppl (mean ± 95% CI) | per-seed val ppl | Δ loss vs {ref} "
        "(95% CI) | real? | expert FLOPs vs top-k | block FLOPs vs top-k | imbalance max/mean | dropped | train tok/s "
        "| wall (s) |",
        "|---|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        if "error" in v:
            lines.append(f"| {v['name']} | `{v['router']}` ({describe_options(v)}) | – | failed | – | – | – | – | – "
                         f"| – | – | – | {v['wall_seconds']:.1f} |")
            continue
        ppl = v["seed_stats"]["val_perplexity"]
        per_seed = ", ".join(_f(r["val_perplexity"], 2) for r in v["runs"])
        d = v.get("paired_vs_reference")
        if d is None:
            diff, real = "–", "–"
        elif v["name"] == ref:
            diff, real = "reference", "–"
        else:
            diff = f"{_signed(d['mean'], 4)} [{_signed(d['low'], 4)}, {_signed(d['high'], 4)}]"
            real = "**yes**" if d["distinguishable"] else "no"
        lines.append(
            f"| {v['name']} | `{v['router']}` ({describe_options(v)}) | {causal_label(v)} "
            f"| {_f(ppl['mean'], 2)} ± {_f(ppl['half_width'], 2)} | {per_seed} | {diff} | {real} "
            f"| {_f(v['active_expert_flops_vs_topk'], 2)}× | {_f(v.get('active_block_flops_vs_topk'), 2)}× "
            f"| {_f(v['imbalance_max_over_mean'], 2)} | {v['dropped_fraction']:.1%} | {v['train_tokens_per_second']:,.0f} | {v['wall_seconds']:.1f} |"
        )
    return lines


def _signed(value: float, digits: int) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:+.{digits}f}"


def _f(value: float, digits: int) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _figure(size: tuple[float, float]) -> Figure:
    """A figure on its own Agg canvas: no pyplot, so the caller's matplotlib backend and figures are untouched."""
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    """Render `fig` as a PNG and write it atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def _colors(n: int) -> list:
    """Distinct colours: the ten strong tab20 colours first, then their light partners."""
    cmap = colormaps["tab20"]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return [cmap(order[i % 20]) for i in range(n)]


def plot_val_loss(variants: list[dict[str, Any]], path: Path) -> Path:
    """Two panels: the whole run, and the second half zoomed in (where the variants separate)."""
    fig = _figure((13, 5.5))
    full, zoom = fig.subplots(1, 2)
    markers = "os^Dv<>pP*Xh"
    last_step = max(r["step"] for v in variants for r in v["val_curve"])
    zoom_values = []
    for i, (v, color) in enumerate(zip(variants, _colors(len(variants)))):
        steps = [r["step"] for r in v["val_curve"]]
        losses = [r["val_loss"] for r in v["val_curve"]]
        comparable = v["causal_eval"] or v.get("model_kind") == "diffusion_lm"
        style = "-" if comparable else ":"
        label = v["name"] + ("" if comparable else " (non-causal: not comparable)")
        for ax in (full, zoom):
            ax.plot(steps, losses, style, color=color, marker=markers[i % len(markers)], markersize=4,
                    label=label if ax is full else None)
        zoom_values += [loss for step, loss in zip(steps, losses) if step >= last_step / 2]
    full.set_title("Validation loss (lower is better)")
    zoom.set_title("Second half of training, zoomed in")
    if zoom_values:
        lo, hi = min(zoom_values), max(zoom_values)
        pad = max(1e-3, 0.05 * (hi - lo))
        zoom.set_xlim(last_step / 2 - 0.02 * last_step, last_step * 1.02)
        zoom.set_ylim(lo - pad, hi + pad)
    for ax in (full, zoom):
        ax.set_xlabel("training step")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=9, frameon=False)
    _save(fig, path)
    return path


def _heatmap_panels(
    variants: list[dict[str, Any]], matrices: list[np.ndarray], path: Path, *, panel_size: tuple[float, float],
    cmap: str, vmax: float, colorbar_label: str, title: str, row_labels: list[str] | None = None,
    row_title: str | None = None, row_group: int | None = None,
) -> Path:
    """One heatmap a variant ([rows, experts]), up to 4 panels a row, one shared colour bar from 0 to vmax; a white
    line after every `row_group` rows."""
    n = len(variants)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = _figure((panel_size[0] * cols, panel_size[1] * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for ax, v, m in zip(axes.flat, variants, matrices):
        image = ax.imshow(m, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_title(v["name"], fontsize=10)
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]), labels=row_labels)
        for boundary in range(row_group, m.shape[0], row_group) if row_group else ():
            ax.axhline(boundary - 0.5, color="white", linewidth=1.5)
        ax.set_xlabel("expert", fontsize=8)
        if row_title is not None:
            ax.set_ylabel(row_title, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8, label=colorbar_label)
    fig.suptitle(title)
    _save(fig, path)
    return path


def plot_expert_load(variants: list[dict[str, Any]], path: Path) -> Path:
    rel = []
    for v in variants:
        load = np.asarray(v["load"], dtype=float)  # [layers, E]
        mean = load.mean(axis=1, keepdims=True)
        rel.append(np.divide(load, mean, out=np.zeros_like(load), where=mean > 0))
    return _heatmap_panels(variants, rel, path, panel_size=(3.4, 0.45 * rel[0].shape[0] + 1.6), cmap="viridis",
                           vmax=max(2.0, max(float(r.max()) for r in rel)), row_title="MoE layer",
                           colorbar_label="load ÷ mean load (1 = balanced)",
                           title="Expert load per MoE layer (validation set)")


def plot_experts_per_token(variants: list[dict[str, Any]], path: Path) -> Path:
    counts = sorted({int(k) for v in variants for k in v["experts_per_token_histogram"]})
    xs = list(range(min(counts), max(counts) + 1))
    width = 0.8 / len(variants)
    fig = _figure((max(7, 1.2 * len(xs) + 3), 5))
    ax = fig.subplots()
    for i, (v, color) in enumerate(zip(variants, _colors(len(variants)))):
        hist = v["experts_per_token_histogram"]
        total = sum(hist.values())
        ys = [hist.get(str(x), 0) / total for x in xs]
        ax.bar([x - 0.4 + (i + 0.5) * width for x in xs], ys, width=width, color=color, label=v["name"])
    ax.set_xticks(xs)
    ax.set_xlabel("routed experts per token (per MoE layer)")
    ax.set_ylabel("fraction of tokens")
    ax.set_title("How many experts each token used")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    _save(fig, path)
    return path


def plot_domain_load(variants: list[dict[str, Any]], path: Path) -> Path:
    """Per variant: rows (MoE layer, domain), columns experts; each row is the share of that domain's assignments
    in that layer going to each expert (experts of different layers are different experts, so layers stay apart)."""
    domains = list(variants[0]["load_by_domain"])
    shares = []
    for v in variants:
        per_domain = np.asarray([v["load_by_domain"][d] for d in domains], dtype=float)  # [domains, layers, E]
        m = per_domain.transpose(1, 0, 2).reshape(-1, per_domain.shape[-1])  # [(layer, domain), E]
        total = m.sum(axis=1, keepdims=True)
        shares.append(np.divide(m, total, out=np.zeros_like(m), where=total > 0))
    n_rows = shares[0].shape[0]
    labels = [f"L{layer} {d}" for layer in range(n_rows // len(domains)) for d in domains]
    return _heatmap_panels(variants, shares, path, panel_size=(3.6, 0.28 * n_rows + 1.4), cmap="magma",
                           vmax=max(float(s.max()) for s in shares), row_labels=labels, row_group=len(domains),
                           colorbar_label="share of the domain's assignments in that layer",
                           title="Which experts each domain uses, per MoE layer (validation set)")


def plot_quality_vs_compute(variants: list[dict[str, Any]], path: Path) -> Path:
    """One point per variant: active block FLOPs per token (relative to top-k; `models/flops.py`: attention
    projections and feed-forward of the blocks each token ran, routed experts by width and repeat) against validation
    perplexity,
    with the 95% t-interval of the perplexity as an error bar when there are several seeds. Lower-left is better:
    a dynamic-compute method is judged by where it sits against the others, not by perplexity alone."""
    fig = _figure((8.5, 5.5))
    ax = fig.subplots()
    markers = "os^Dv<>pP*Xh"
    xs = [v.get("active_block_flops_vs_topk", math.nan) for v in variants]
    finite = [x for x in xs if math.isfinite(x)]
    span = (max(finite) - min(finite)) if len(finite) > 1 and max(finite) > min(finite) else 1.0
    groups = [round(x, 3) if math.isfinite(x) else None for x in xs]  # variants spending the same compute
    for i, (v, color) in enumerate(zip(variants, _colors(len(variants)))):
        # dodge: variants at the same compute are spread a little sideways so their intervals stay apart
        peers = [j for j, g in enumerate(groups) if g == groups[i]]
        x = xs[i] + 0.015 * span * (peers.index(i) - (len(peers) - 1) / 2)
        stats = (v.get("seed_stats") or {}).get("val_perplexity")
        y = stats["mean"] if stats else v["val_perplexity"]
        err = stats["half_width"] if stats and math.isfinite(stats["half_width"]) else None
        label = v["name"] + ("" if v["causal_eval"] else " (non-causal: not comparable)")
        ax.errorbar([x], [y], yerr=None if err is None else [[err], [err]], fmt=markers[i % len(markers)],
                    color=color, capsize=4, markersize=7, label=label)
    ax.set_xlabel("active block FLOPs per token (relative to top-k; equal values drawn slightly apart)")
    ax.set_ylabel("validation perplexity (lower is better)")
    n_seeds = max(len(v.get("runs") or [None]) for v in variants)
    ax.set_title("Quality against compute" + (f" (mean and 95% t-interval over {n_seeds} seeds)" if n_seeds > 1
                                              else " (one seed)"))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    _save(fig, path)
    return path

"""The `routelab finetune` report: report.md (one table), val_loss.png and expert_load.png beside results.json."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from routelab._atomic import atomic_write_bytes, atomic_write_text


def write_report(summary: dict[str, Any], out: Path) -> list[Path]:
    written = [plot_val_loss(summary, out / "val_loss.png")]
    routed = [v for v in summary["variants"] if v.get("load")]
    if routed:
        written.append(plot_expert_load(routed, out / "expert_load.png"))
    atomic_write_text(out / "report.md", render_markdown(summary, [p.name for p in written]))
    return written + [out / "report.md"]


def _f(value: float | None, digits: int) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def render_markdown(summary: dict[str, Any], plots: list[str]) -> str:
    s, base = summary["settings"], summary["base"]
    new = ", ".join(f"{d['name']} ({d['source']})" for d in summary["data"]["new"])
    orig = ", ".join(f"{d['name']}" for d in summary["data"]["original"])
    lines = [
        "# routelab finetune",
        "",
        f"Model `{summary['model']}` fine-tuned on **{new}**; original domain(s): {orig}. Adapters on "
        f"{len(s['wrapped_layers'])} linear layers ({', '.join(s['target_modules'])}); E={s['experts']} experts of "
        f"rank r={s['r']}, k={s['k']}; {s['steps']} steps of {s['batch_size']}×{s['seq_len']} tokens, lr {s['lr']}, "
        f"seed {s['seed']} for every variant (same batches, same order). Plain LoRA of rank {s['lora_rank']} is the "
        "baseline with about the first method's trainable parameters.",
        "",
        "| variant | trainable params | new-domain val ppl | original-domain ppl | forgetting (Δ ppl) | adapter MFLOPs/token "
        "| train tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| base model (no adapters) | 0 | {_f(base['new_val_perplexity'], 2)} | {_f(base['original_perplexity'], 2)} "
        "| – | 0 | – |",
    ]
    for v in summary["variants"]:
        forgetting = v["original_perplexity"] - base["original_perplexity"]
        lines.append(
            f"| {v['name']} | {v['trainable_params']:,} | {_f(v['new_val_perplexity'], 2)} "
            f"| {_f(v['original_perplexity'], 2)} | {forgetting:+.2f} | {_f(v['adapter_flops_per_token'] / 1e6, 3)} "
            f"| {v['train_tokens_per_second']:,.0f} |"
        )
    lines += [
        "",
        "How to read it:",
        "- **new-domain val ppl**: perplexity on the held-out part of the fine-tuning text (lower is better).",
        "- **original-domain ppl / forgetting**: perplexity on the held-out part of the text the model was trained "
        "on, and its change from the base model (lower forgetting is better).",
        "- **adapter MFLOPs/token**: active adapter FLOPs per token summed over the wrapped layers, routers included, "
        "as the method computes them mathematically (active ranks only; the stacked execution spends more).",
        f"- **train tok/s**: training throughput on this machine ({s['threads']} threads); `remix` runs "
        f"{s['rloo_samples']} forwards per step (its RLOO estimator), so its tokens/s counts each batch once.",
        "- One seed: differences of a few percent are within seed noise at this scale; rerun with `--seed`.",
    ]
    captions = {"val_loss.png": "New-domain validation loss during fine-tuning",
                "expert_load.png": "Expert load per wrapped layer (load ÷ mean load; 1 = balanced)"}
    for name in plots:
        lines += ["", f"## {captions[name]}", "", f"![{captions[name]}]({name})"]
    lines += ["", f"Total wall time {summary['wall_seconds']:.0f} s. Every number is in `results.json`; each "
              "variant's adapters are in `variants/<name>/adapters` (`routelab.adapters.load_adapters`).", ""]
    return "\n".join(lines)


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_val_loss(summary: dict[str, Any], path: Path) -> Path:
    fig = _figure((8, 5))
    ax = fig.subplots()
    base = summary["base"]["new_val_loss"]
    for v in summary["variants"]:
        steps = [0] + [r["step"] for r in v["val_curve"]]
        ax.plot(steps, [base] + [r["val_loss"] for r in v["val_curve"]], marker="o", markersize=3, label=v["name"])
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("new-domain validation loss (nats/token)")
    ax.set_title("Fine-tuning on the new domain (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, frameon=False)
    return _save(fig, path)


def plot_expert_load(variants: list[dict[str, Any]], path: Path) -> Path:
    n = len(variants)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    mats = []
    for v in variants:
        load = np.asarray(list(v["load"].values()), dtype=float)  # [layers, experts]
        mean = load.mean(axis=1, keepdims=True)
        mats.append(np.divide(load, mean, out=np.zeros_like(load), where=mean > 0))
    fig = _figure((4.2 * cols, (0.35 * mats[0].shape[0] + 1.8) * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    vmax = max(2.0, max(float(m.max()) for m in mats))
    image = None
    for ax, v, m in zip(axes.flat, variants, mats):
        image = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_title(v["name"], fontsize=10)
        ax.set_yticks(range(m.shape[0]), labels=list(v["load"]), fontsize=6)
        ax.set_xticks(range(0, m.shape[1], max(1, m.shape[1] // 16)))
        ax.set_xlabel("expert (smora/flylora: rank; mhr: head·skill)", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8, label="load ÷ mean load")
    fig.suptitle("Expert load per wrapped layer (new-domain validation set)")
    return _save(fig, path)

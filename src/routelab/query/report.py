"""The query-eval report folder: report.md, results.json and PNG plots (cost–quality curves with their convex hulls,
each model's share of queries along every router's sweep, LinUCB's cumulative regret)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from routelab._atomic import atomic_write_bytes, atomic_write_text
from routelab.query import metrics

METRIC_DEFINITIONS = """\
- **Curve**: each router's knob swept (willingness to pay λ: argmax of predicted score − λ·cost; or, for two
  models, the threshold on the strong model's predicted win rate, set at evenly spaced target shares of strong
  calls on the test prompts, RouteLLM's calibration; cascades: the escalation threshold). Every point is the mean
  cost and mean score over the test prompts; a query is charged for every model it called.
- **AIQ** (RouterBench, Hu et al. 2024): area under the router's non-decreasing convex hull over the single models'
  cost range, divided by the width of that range (hulls extended flat beyond their end points; a single point's AIQ
  is its quality). Higher is better; a hull point is reachable by mixing two operating points at random.
- **Quality at best-single cost**: the best quality among the router's operating points that cost no more than the
  best single model (no mixing). **Cost to reach best-single quality**: the cheapest operating point at least as good
  as the best single model (— if none).
- **Gap closed**: (quality − best single) / (oracle − best single), at the router's best point and at the best point
  within the best single model's cost.
- **APGR** (RouteLLM, Ong et al. 2024), two models: PGR(x) = (quality − weak) / (strong − weak) as a function of
  the share x of calls to the strong model; APGR = area under PGR over x in [0, 1] (trapezoid rule; end points
  all-weak and all-strong). Random: 0.5 in expectation. **CPT(p)**: the smallest share of strong calls at which PGR
  reaches p (linear between points). Random: CPT(50%) = 50%, CPT(80%) = 80%.
- **Oracle**: the best model per query read from the test labels — an UPPER BOUND, not a router. A cascade with a
  simulated judge (judge_error) also reads the test labels and is flagged the same way.
- Metric code: `routelab.query.metrics`.
"""


def _fmt(x, digits=3, pct=False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{100 * x:.1f}%" if pct else f"{x:.{digits}f}"


def _cost(x, unit_is_share: bool) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}%" if unit_is_share else f"${x:.3g}"


def write_report(results: dict, out: Path, *, command: str = "") -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_curves(results, out / "curves.png"), plot_shares(results, out / "model_share.png")]
    if any("replay" in r for r in results["routers"].values()):
        written.append(plot_regret(results, out / "regret.png"))
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "report.md", render_markdown(results, [p.name for p in written], command))
    return written + [out / "results.json", out / "report.md"]


def render_markdown(results: dict, plots: list[str], command: str = "") -> str:
    share_unit = results["cost_unit"].startswith("share")
    two = len(results["models"]) == 2
    best = results["best_single"]
    lines = ["# Request routing: cost–quality report", ""]
    if command:
        lines += [f"`{command}`", ""]
    lines += [f"- Protocol: {results['protocol']}; {results['num_test_prompts']} test prompts; encoder "
              f"`{results['encoder']}`.",
              f"- Models: {', '.join(results['models'])}.",
              f"- Cost: {results['cost_unit']}."
              + (" **Costs are ESTIMATED** from a price table and token counts, not measured." if
                 results["costs_estimated"] else "")]
    lines += [f"- Note: {n}" for n in results["notes"]]
    lines += ["", f"Best single model: **{best['model']}**, quality {_fmt(best['quality'])} at cost "
              f"{_cost(best['cost'], share_unit)}. Oracle (upper bound): {_fmt(results['oracle_quality'])}.", ""]
    lines += ["## Routers", ""]
    head = ["router", "AIQ", "max quality", "quality at best-single cost", "cost to reach best-single quality",
            "gap closed (max)", "gap closed (≤ best-single cost)"]
    if two:
        head += ["APGR", "CPT(50%)", "CPT(80%)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(results["routers"].items(), key=lambda kv: (kv[1]["upper_bound"], -kv[1]["aiq"]))
    for label, r in order:
        name = f"{label} (UPPER BOUND)" if r["upper_bound"] else label
        row = [name, _fmt(r["aiq"]), _fmt(r["max_quality"]), _fmt(r["quality_at_best_single_cost"]),
               _cost(r["cost_to_reach_best_single_quality"], share_unit), _fmt(r["gap_closed_max"], pct=True),
               _fmt(r["gap_closed_at_best_single_cost"], pct=True)]
        if two:
            apgr = _fmt(r["apgr"])
            if r.get("apgr_per_fold"):
                apgr += f" ± {np.std(r['apgr_per_fold']):.3f}"
            row += [apgr, _fmt(r["cpt50"], pct=True), _fmt(r["cpt80"], pct=True)]
        lines.append("| " + " | ".join(row) + " |")
    if two:
        lines += ["", "Random reference: APGR 0.5, CPT(50%) = 50%, CPT(80%) = 80% in expectation; ± is the standard "
                  "deviation over folds."]
    lines += ["", "## Single models", "", "| model | quality | cost |", "|---|---|---|"]
    for mname, s in results["single_models"].items():
        lines.append(f"| {mname} | {_fmt(s['quality'])} | {_cost(s['cost'], share_unit)} |")
    cats = results["per_category_single"]
    if len(cats) > 1:
        op = "the point nearest 50% strong calls" if two else "the best point within the best single model's cost"
        lines += ["", f"## Per category (routers at {op})", ""]
        labels = [lab for lab, _ in order]
        lines += ["| category | n | best single there | " + " | ".join(labels) + " |",
                  "|" + "---|" * (3 + len(labels))]
        for cat, singles in cats.items():
            first = next(iter(results["routers"].values()))["operating_point"]["per_category"][cat]
            top = max(singles, key=singles.get)
            row = [cat, str(first["n"]), f"{top} {_fmt(singles[top])}"]
            row += [_fmt(results["routers"][lab]["operating_point"]["per_category"][cat]["quality"]) for lab in labels]
            lines.append("| " + " | ".join(row) + " |")
    replays = {lab: r["replay"] for lab, r in results["routers"].items() if "replay" in r}
    if replays:
        lines += ["", "## Online replay (LinUCB)", "",
                  "After learning from the training stream, LinUCB keeps learning on the test stream, seeing only "
                  "the score of the model it chose; regret = oracle's score − its score, summed (λ = 0).", ""]
        for lab, rep in replays.items():
            lines.append(f"- {lab}: regret per query {rep['final_regret_per_query']:.3f} "
                         f"(a uniformly random choice: {rep['random_regret_per_query']:.3f}).")
    lines += ["", "## Timings", ""]
    lines += [f"- {lab}: {t:.1f} s (fit, predict and sweep, all folds; shared machine)"
              for lab, t in results["timings_s"].items()]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Metric definitions", "", METRIC_DEFINITIONS]
    return "\n".join(lines) + "\n"


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_curves(results: dict, path: Path) -> Path:
    share_unit = results["cost_unit"].startswith("share")
    fig = Figure(figsize=(9, 6))
    ax = fig.add_subplot()
    for label, r in results["routers"].items():
        c, q = np.array(r["curve"]["cost"]), np.array(r["curve"]["quality"])
        x = r["curve"]["share_strong"] if share_unit else c
        style = "--" if r["upper_bound"] else "-"
        (line,) = ax.plot(x, q, style, marker=".", markersize=3, linewidth=0.8, alpha=0.6,
                          label=f"{label}{' (upper bound)' if r['upper_bound'] else ''}")
        hc, hq = metrics.convex_hull(np.asarray(x), q)
        ax.plot(hc, hq, style, color=line.get_color(), linewidth=1.8)
    for mname, s in results["single_models"].items():
        x = (1.0 if s["cost"] > 0 else 0.0) if share_unit else s["cost"]
        ax.scatter([x], [s["quality"]], marker="*", s=90, zorder=5)
        ax.annotate(mname, (x, s["quality"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("share of calls to the strong model" if share_unit else
                  "mean cost per query ($" + (", estimated" if results["costs_estimated"] else "") + ")")
    ax.set_ylabel("mean quality")
    ax.set_title("Cost–quality curves (thin: operating points; thick: non-decreasing convex hull)")
    if not share_unit:
        ax.set_xscale("log")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_shares(results: dict, path: Path) -> Path:
    routers = [(lab, r) for lab, r in results["routers"].items()]
    cols = 3
    rows = max(1, math.ceil(len(routers) / cols))
    fig = Figure(figsize=(4.2 * cols, 2.8 * rows))
    models = results["models"]
    for i, (label, r) in enumerate(routers):
        ax = fig.add_subplot(rows, cols, i + 1)
        share = np.array(r["curve"]["model_share"])  # [K, M]
        ax.stackplot(np.arange(len(share)), share.T, labels=models)
        ax.set_title(f"{label} ({r['knob']})", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_xlabel("sweep point", fontsize=7)
        ax.tick_params(labelsize=6)
        if i == 0:
            ax.set_ylabel("share of queries", fontsize=7)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), fontsize=6, loc="upper center", ncol=min(len(models), 5))
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _save(fig, path)


def plot_regret(results: dict, path: Path) -> Path:
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for label, r in results["routers"].items():
        if "replay" in r:
            ax.plot(r["replay"]["cumulative_regret"], label=label)
            ax.plot(r["replay"]["random_cumulative_regret"], "--", label="random choice")
    ax.set_xlabel("test queries (subsampled)")
    ax.set_ylabel("cumulative regret vs oracle")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)

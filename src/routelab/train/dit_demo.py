"""The diffusion demo: a small MoE DiT (`models.dit`) trained on scikit-learn's 8×8 handwritten digits with a chosen
router, a grid of samples per class, and a quality number.

Data: `sklearn.datasets.load_digits` — 1,797 real 8×8 images, pixel values 0..16, shipped inside scikit-learn
(nothing is downloaded). A fixed permutation (seed 0) splits them 80 / 20; the DiT trains on the 80 %, pixels scaled
to [-1, 1].

Quality number ("classifier accuracy on generated digits"): a multinomial logistic regression (scikit-learn,
on the 64 raw pixel values) is trained on the same 80 % of real digits; for each class c the DiT generates
`samples_per_class` images conditioned on c (guidance `guidance`), which are mapped back to the 0..16 pixel scale
(clipped), and the number is the fraction the classifier assigns to c — per class and averaged over classes. Its
ceiling is the same classifier's accuracy on the 20 % of held-out real digits (reported beside it). It measures
whether samples are recognisably the requested digit, not their diversity.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from routelab._atomic import atomic_write_bytes, atomic_write_text
from routelab._runs import RunLayout, check_out, claim_out
from routelab.models.dit import DiT, DiTConfig
from routelab.routing.base import update_routers

DEMO_FILES = ("samples.png", "result.json", "report.md")


def demo_layout() -> RunLayout:
    return RunLayout("diffusion-demo", {"": DEMO_FILES})


def load_digit_split(seed: int = 0) -> dict[str, torch.Tensor]:
    """{x_train, y_train, x_test, y_test}: images [N, 1, 8, 8] on the 0..16 scale (float) and labels, 80 / 20."""
    from sklearn.datasets import load_digits  # scikit-learn: the `diffusion` extra

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None]
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(y))
    tr, te = order[:n_train], order[n_train:]
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}


def to_model_scale(x: torch.Tensor) -> torch.Tensor:
    return x / 8.0 - 1.0


def to_pixel_scale(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1.0) * 8.0).clamp(0.0, 16.0)


def train_dit(config: DiTConfig, x_train: torch.Tensor, y_train: torch.Tensor, *, steps: int, batch_size: int,
              lr: float, seed: int, log=None) -> tuple[DiT, list[float]]:
    """AdamW with linear warm-up (5 % of the steps) and cosine decay; batches and noise from (seed, step)."""
    torch.manual_seed(seed)
    model = DiT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    x_model = to_model_scale(x_train)
    losses = []
    model.train()
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(scale, 0.05)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, len(y_train), (batch_size,), generator=g)
        loss, mse = model.loss(x_model[idx], y_train[idx], generator=g, step=step)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the training loss is {loss.item()} at step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        update_routers(model)
        losses.append(mse.item())
        if log is not None and ((step + 1) % max(1, steps // 10) == 0 or step + 1 == steps):
            log(f"step {step + 1}/{steps}: flow-matching loss {sum(losses[-20:]) / len(losses[-20:]):.4f}")
    return model, losses


def classifier_quality(split: dict[str, torch.Tensor], samples: torch.Tensor, requested: torch.Tensor) -> dict[str, Any]:
    """Accuracy of a logistic regression trained on the real training digits: on generated `samples` (model scale)
    against the `requested` classes, and on the held-out real digits (the ceiling)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000)
    clf.fit(split["x_train"].reshape(len(split["y_train"]), -1).numpy(), split["y_train"].numpy())
    real_acc = float((clf.predict(split["x_test"].reshape(len(split["y_test"]), -1).numpy())
                      == split["y_test"].numpy()).mean())
    pred = torch.tensor(clf.predict(to_pixel_scale(samples).reshape(len(requested), -1).numpy()))
    per_class = {str(c): float((pred[requested == c] == c).float().mean()) for c in requested.unique().tolist()}
    return {"generated_accuracy": float((pred == requested).float().mean()), "generated_accuracy_by_class": per_class,
            "real_heldout_accuracy": real_acc}


def save_grid(samples: torch.Tensor, rows: int, path: Path, title: str) -> None:
    """A PNG grid: one row per class, its samples side by side (0..16 pixel scale, white background)."""
    import io

    import matplotlib

    from matplotlib.figure import Figure

    _ = matplotlib  # the Figure API needs no backend selection (no pyplot state is touched)
    cols = samples.shape[0] // rows
    fig = Figure(figsize=(cols * 0.8 + 0.6, rows * 0.8 + 0.5))
    axes = fig.subplots(rows, cols, squeeze=False)
    pixels = to_pixel_scale(samples)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(pixels[r * cols + c, 0].numpy(), cmap="gray_r", vmin=0, vmax=16, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(str(r), rotation=0, labelpad=10, fontsize=10)
    fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    atomic_write_bytes(path, buf.getvalue())


def run_diffusion_demo(
    *, out_dir: str | Path, router: str = "topk", router_options: dict[str, Any] | None = None, steps: int = 2000,
    batch_size: int = 64, lr: float = 2e-3, samples_per_class: int = 8, sample_steps: int = 24,
    guidance: float = 2.0, seed: int = 0, overwrite: bool = False, config: DiTConfig | None = None, log=print,
) -> dict[str, Any]:
    """Train, sample, score and write samples.png, result.json and report.md into `out_dir`; returns the result."""
    cfg = config or DiTConfig(d_model=48, n_layers=3, n_heads=3, d_ff=48, num_experts=4, router=router,
                              router_options=dict(router_options or {}))
    cfg.validate()
    with torch.device("meta"):
        DiT(cfg)  # bad router options fail here, before the data or the folder are touched
    out = Path(out_dir)
    layout = demo_layout()
    check_out(out, layout, overwrite=overwrite)
    started = time.perf_counter()
    split = load_digit_split()
    claim_out(out, layout, resume=False, overwrite=overwrite)
    model, losses = train_dit(cfg, split["x_train"], split["y_train"], steps=steps, batch_size=batch_size, lr=lr,
                              seed=seed, log=log)
    train_seconds = time.perf_counter() - started
    requested = torch.arange(cfg.num_classes).repeat_interleave(samples_per_class)
    samples = model.sample(requested, steps=sample_steps, guidance=guidance,
                           generator=torch.Generator().manual_seed(seed + 1))
    quality = classifier_quality(split, samples, requested)
    save_grid(samples, cfg.num_classes, out / "samples.png",
              f"{router} DiT, {steps} steps, guidance {guidance}: classifier accuracy "
              f"{quality['generated_accuracy']:.0%} (real held-out {quality['real_heldout_accuracy']:.0%})")
    result = {
        "model": cfg.to_dict(),
        "params": sum(p.numel() for p in model.parameters()),
        "train": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "train_images": len(split["y_train"])},
        "sampling": {"samples_per_class": samples_per_class, "steps": sample_steps, "guidance": guidance},
        "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
        **quality,
        "quality_definition": "fraction of generated samples of each requested class that a logistic regression "
                              "trained on the real training digits assigns to that class (mean over classes); "
                              "real_heldout_accuracy is the same classifier on held-out real digits",
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }
    atomic_write_text(out / "result.json", json.dumps(result, indent=1))
    atomic_write_text(out / "report.md", render_demo_report(result))
    return result


def render_demo_report(result: dict[str, Any]) -> str:
    m, t, s = result["model"], result["train"], result["sampling"]
    by_class = result["generated_accuracy_by_class"]
    lines = [
        "# routelab diffusion-demo",
        "",
        f"A DiT with MoE FFNs (router `{m['router']}`{' ' + json.dumps(m['router_options']) if m['router_options'] else ''}, "
        f"{m['num_experts']} experts of width "
        f"{m['d_ff']}, d_model {m['d_model']}, {m['n_layers']} blocks, {result['params']:,} parameters) trained by flow "
        f"matching on {t['train_images']} real 8×8 digits (scikit-learn), {t['steps']} steps × {t['batch_size']}, "
        f"seed {t['seed']}; {s['samples_per_class']} samples per class, {s['steps']} Euler steps, classifier-free "
        f"guidance {s['guidance']}.",
        "",
        "| quality | value |",
        "|---|---:|",
        f"| classifier accuracy on generated digits (mean over classes) | {result['generated_accuracy']:.1%} |",
        f"| same classifier on held-out real digits (ceiling) | {result['real_heldout_accuracy']:.1%} |",
        f"| final flow-matching loss (mean of the last 50 steps) | {result['final_train_loss']:.4f} |",
        f"| training time (s) | {result['train_seconds']:.0f} |",
        "",
        "| class | " + " | ".join(by_class) + " |",
        "|---|" + "---:|" * len(by_class),
        "| accuracy | " + " | ".join(f"{v:.0%}" for v in by_class.values()) + " |",
        "",
        f"Quality number: {result['quality_definition']}. It says whether the samples are recognisably the requested "
        "digit, not how diverse they are (guided samples can be more prototypical than real digits, so the number can "
        "exceed the ceiling).",
        "",
        "![samples](samples.png)",
        "",
    ]
    return "\n".join(lines)

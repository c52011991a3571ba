"""Fine-tune a trained routelab model on new text with each routed-LoRA method, side by side (`routelab finetune`).

Every variant starts from the same model folder, trains adapters only (the base, its MoE routers included, is
frozen and evaluated in eval mode), sees the same batches of the new domain in the same order (a function of the
seed and step), and gets the same number of steps. Plain LoRA is the baseline, with the rank whose trainable
parameter count is closest to the first routed method's. The report (report.md, results.json, plots) gives per
variant: validation perplexity on the new domain, perplexity on the model's original domain(s) (forgetting: the
change from the base model's), trainable parameters, active adapter FLOPs per token, training tokens/s, and the
expert load of every wrapped layer.

Data specs: a UTF-8 text file path, or "builtin:prose" / "builtin:code" (the built-in corpus' domains). The original
domains default to what the model's training.json says it was trained on (the built-in corpus or its files).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from routelab._atomic import atomic_write_text
from routelab.adapters.io import save_adapters
from routelab.adapters.linear import adapter_aux_loss, routed_lora_layers
from routelab.adapters.remix import rloo_loss
from routelab.adapters.wrap import METHODS, AdapterSpec, add_lora_experts, count_parameters, matching_linears
from routelab.data.corpus import DataError, Domain, builtin_corpus, file_corpus
from routelab.data.dataset import DomainTokens, TokenData, split_text
from routelab.data.tokenizer import encode
from routelab.routing.base import update_routers
from routelab.train.loop import TrainConfig, lr_at, steady_tokens_per_second

DEFAULT_TARGETS = ("qkv", "proj", "gate_up", "down")
BUILTIN = "builtin:"


def resolve_domains(specs: list[str], *, max_chars: int) -> list[Domain]:
    """Domains from specs (file paths or builtin:prose / builtin:code); a DataError names a bad one."""
    builtin = None
    out: list[Domain] = []
    files = [s for s in specs if not s.startswith(BUILTIN)]
    by_file = {d.source: d for d in file_corpus(files)} if files else {}
    for spec in specs:
        if spec.startswith(BUILTIN):
            if builtin is None:
                builtin = {d.name: d for d in builtin_corpus(max_chars=max_chars)}
            name = spec[len(BUILTIN):]
            if name not in builtin:
                raise DataError(f"unknown built-in domain {spec!r}; valid: "
                                + ", ".join(BUILTIN + n for n in builtin))
            out.append(builtin[name])
        else:
            d = by_file[str(Path(spec))]
            out.append(Domain(d.name, d.text[:max_chars], d.source))
    return out


def original_specs(training: dict[str, Any] | None) -> tuple[list[str], int, float]:
    """(specs, max_chars, val_fraction) of the data a model was trained on, from its training.json."""
    data = ((training or {}).get("config") or {}).get("data") or {}
    max_chars = int(data.get("max_chars") or 0) or 10**12
    val_fraction = float(data.get("val_fraction") or 0.1)
    if data.get("source", "builtin") == "files" and data.get("files"):
        return [str(f) for f in data["files"]], max_chars, val_fraction
    return [BUILTIN + "prose", BUILTIN + "code"], max_chars, val_fraction


def tokenize_with(domains: list[Domain], tokenizer: Any, *, val_fraction: float) -> TokenData:
    """The domains encoded with an existing tokenizer (the model's), split train/validation as training did."""
    out = []
    for d in domains:
        train, val = split_text(d.text, val_fraction)
        out.append(DomainTokens(d.name, d.source, torch.tensor(encode(tokenizer, train), dtype=torch.long),
                                torch.tensor(encode(tokenizer, val), dtype=torch.long)))
    return TokenData(out, tokenizer, tokenizer.get_vocab_size(), "model", True)


def plain_lora_rank(target_params: int, shapes: list[tuple[int, int]]) -> int:
    """The LoRA rank whose trainable parameters (Σ r·(in+out) over the layers) are closest to `target_params`."""
    per_rank = sum(i + o for i, o in shapes)
    return max(1, round(target_params / per_rank))


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_sets: list[tuple[str, torch.Tensor, torch.Tensor]], *, batch_size: int,
             stats: bool = False) -> dict[str, Any]:
    """Mean next-token loss per domain (and overall); with `stats`, the routed-LoRA layers' expert loads and the
    mean active adapter FLOPs per token (summed over the wrapped layers)."""
    layers = routed_lora_layers(model)
    by_domain: dict[str, float] = {}
    total, count, flops_sum, batches = 0.0, 0, 0.0, 0
    loads: dict[str, torch.Tensor] = {}
    for name, inputs, targets in val_sets:
        dom_loss, dom_n = 0.0, 0
        for i in range(0, inputs.shape[0], batch_size):
            x, y = inputs[i:i + batch_size], targets[i:i + batch_size]
            logits = model(x)[0]
            dom_loss += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                                        reduction="sum").item()
            dom_n += y.numel()
            if stats:
                batches += 1
                flops_sum += sum(layer.last_adapter_flops for layer in layers.values())
                for lname, layer in layers.items():
                    dec = layer.last_decision
                    if dec is not None:
                        load = dec.expert_load().double()
                        loads[lname] = loads[lname] + load if lname in loads else load
        by_domain[name] = dom_loss / dom_n
        total, count = total + dom_loss, count + dom_n
    out: dict[str, Any] = {"val_loss": total / count, "by_domain": by_domain}
    if stats:
        out["adapter_flops_per_token"] = flops_sum / max(1, batches)
        out["load"] = {k: v.tolist() for k, v in loads.items()}
    return out


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def run_finetune(
    model_dir: str | Path,
    *,
    data: list[str],
    methods: list[str],
    out_dir: str | Path,
    r: int = 8,
    experts: int = 8,
    k: int = 2,
    original: list[str] | None = None,
    target_modules: list[str] | None = None,
    steps: int = 100,
    batch_size: int = 8,
    seq_len: int | None = None,
    lr: float = 3e-3,
    seed: int = 0,
    eval_every: int = 25,
    eval_windows: int = 16,
    max_chars: int = 200_000,
    rloo_samples: int = 2,
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fine-tune the model folder `model_dir` once per method (+ plain LoRA) and write the report into `out_dir`."""
    from routelab.adapters.finetune_report import write_report
    from routelab.models.io import TRAINING_FILE, load_model

    started = time.perf_counter()
    out = Path(out_dir)
    unknown = [m for m in methods if m not in METHODS or m == "lora"]
    if unknown or not methods:
        raise ValueError(f"--method must list routed methods among {', '.join(m for m in METHODS if m != 'lora')}; "
                         f"got {', '.join(methods) or 'none'} (plain LoRA is always run as the baseline)")
    base, tokenizer = load_model(model_dir)
    seq_len = min(64, base.config.max_seq_len) if seq_len is None else seq_len
    if seq_len > base.config.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_seq_len={base.config.max_seq_len}")
    training_path = Path(model_dir) / TRAINING_FILE
    training = json.loads(training_path.read_text()) if training_path.is_file() else None
    orig_default, orig_chars, val_fraction = original_specs(training)
    targets = list(target_modules or DEFAULT_TARGETS)
    names = matching_linears(base, targets)
    shapes = [(base.get_submodule(n).in_features, base.get_submodule(n).out_features) for n in names]
    specs: dict[str, AdapterSpec] = {}
    for method in methods:
        method_options = {"k": k * r} if method == "flylora" else {}
        # smora routes over r·E rank experts: k experts of rank r are k·r ranks; mhr mixes every skill, as Poly does.
        router_options = {"flylora": {}, "mhr": {}, "smora": {"k": k * r}}.get(method, {"k": k})
        specs[method] = AdapterSpec(method=method, num_experts=experts, r=r, router_options=router_options,
                                    method_options=method_options)
    for spec in specs.values():  # bad options fail here, before any data loads or anything trains
        spec.build(*shapes[0])
    new_domains = resolve_domains(data, max_chars=max_chars)
    # The original text cut as training cut it, so that its validation part is the one training held out.
    orig_domains = resolve_domains(original or orig_default, max_chars=orig_chars)
    new = tokenize_with(new_domains, tokenizer, val_fraction=val_fraction)
    orig = tokenize_with(orig_domains, tokenizer, val_fraction=val_fraction)
    new.check_windows(seq_len)
    orig.check_windows(seq_len)
    new_val = new.val_windows(seq_len=seq_len, windows_per_domain=eval_windows)
    orig_val = [(n, x, y) for n, x, y in orig.val_windows(seq_len=seq_len, windows_per_domain=eval_windows)]

    base_new = evaluate(base, new_val, batch_size=batch_size)
    base_orig = evaluate(base, orig_val, batch_size=batch_size)
    if not quiet:
        log(f"base model: new-domain val ppl {_ppl(base_new['val_loss']):.2f}, original-domain ppl "
            f"{_ppl(base_orig['val_loss']):.2f}")

    # Trainable parameters of each routed method on the real layers, then the LoRA baseline's matching rank.
    first = copy.deepcopy(base)
    add_lora_experts(first, target_modules=targets, verbose=False, **_kwargs(specs[methods[0]]))
    lora_rank = plain_lora_rank(count_parameters(first)[0], shapes)
    del first
    variants = [(m, specs[m]) for m in methods] + [(f"lora-r{lora_rank}", AdapterSpec(method="lora", r=lora_rank))]
    train_cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup=max(1, steps // 10),
                            seed=seed, eval_every=eval_every)
    train_cfg.validate()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, (name, spec) in enumerate(variants):
        if not quiet:
            log(f"[{i + 1}/{len(variants)}] {name}")
        results.append(_finetune_one(base, name, spec, targets, new, new_val, orig_val, train_cfg,
                                     out / "variants" / name, rloo_samples=rloo_samples, quiet=quiet))
    summary = {
        "format": 1,
        "model": str(model_dir),
        "data": {"new": [{"name": d.name, "source": d.source, "train_tokens": d.train.numel(),
                          "val_tokens": d.val.numel()} for d in new.domains],
                 "original": [{"name": d.name, "source": d.source, "val_tokens": d.val.numel()}
                              for d in orig.domains]},
        "settings": {"methods": methods, "r": r, "experts": experts, "k": k, "target_modules": targets,
                     "wrapped_layers": names, "steps": steps, "batch_size": batch_size, "seq_len": seq_len,
                     "lr": lr, "seed": seed, "rloo_samples": rloo_samples, "lora_rank": lora_rank,
                     "threads": torch.get_num_threads()},
        "base": {"new_val_loss": base_new["val_loss"], "new_val_perplexity": _ppl(base_new["val_loss"]),
                 "original_loss": base_orig["val_loss"], "original_perplexity": _ppl(base_orig["val_loss"]),
                 "original_by_domain": base_orig["by_domain"]},
        "variants": results,
        "wall_seconds": time.perf_counter() - started,
    }
    atomic_write_text(out / "results.json", json.dumps(summary, indent=1))
    write_report(summary, out)
    return summary


def _kwargs(spec: AdapterSpec) -> dict[str, Any]:
    d = spec.to_dict()
    return {"method": d["method"], "num_experts": d["num_experts"], "r": d["r"], "alpha": d["alpha"],
            "dropout": d["dropout"], "router": d["router"], "router_options": d["router_options"],
            "execution": d["execution"], "method_options": d["method_options"]}


def _finetune_one(base, name, spec, targets, new, new_val, orig_val, cfg: TrainConfig, folder: Path, *,
                  rloo_samples: int, quiet: bool) -> dict[str, Any]:
    model = copy.deepcopy(base)
    torch.manual_seed(cfg.seed)
    add_lora_experts(model, target_modules=targets, verbose=False, **_kwargs(spec))
    layers = routed_lora_layers(model)
    # The base (its MoE routers included) runs as at inference and changes nothing; only the adapters train.
    model.eval()
    for layer in layers.values():
        layer.adapter.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.0)
    remix = spec.method == "remix"
    curve, train_curve = [], []
    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=name, unit="step", dynamic_ncols=True, leave=False)
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        inputs, targets_ = new.batch(step, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed)

        def lm_loss(per_sequence: bool = False, inputs=inputs, targets_=targets_):
            logits = model(inputs)[0]
            nll = F.cross_entropy(logits.transpose(1, 2).float(), targets_, reduction="none")  # [B, L]
            return nll.mean(1) if per_sequence else nll.mean()

        if remix:
            loss = rloo_loss(model, lambda: lm_loss(per_sequence=True), num_samples=rloo_samples)
        else:
            loss = lm_loss()
        total = loss + adapter_aux_loss(model)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        for layer in layers.values():  # the adapters' routers only: the base's router state stays frozen
            update_routers(layer.adapter)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"{name}: the training loss is {value} at step {step}")
        train_curve.append({"step": step + 1, "loss": value, "seconds": time.perf_counter() - t0})
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            _set_adapter_mode(layers, False)
            curve.append({"step": step + 1, "val_loss": evaluate(model, new_val, batch_size=cfg.batch_size)["val_loss"]})
            _set_adapter_mode(layers, True)
        if bar is not None:
            bar.set_postfix(loss=f"{value:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    _set_adapter_mode(layers, False)
    final_new = evaluate(model, new_val, batch_size=cfg.batch_size, stats=True)
    final_orig = evaluate(model, orig_val, batch_size=cfg.batch_size)
    save_adapters(model, folder / "adapters")
    trainable, total = count_parameters(model)
    return {
        "name": name,
        "method": spec.method,
        "spec": spec.to_dict(),
        "trainable_params": trainable,
        "total_params": total,
        "new_val_loss": final_new["val_loss"],
        "new_val_perplexity": _ppl(final_new["val_loss"]),
        "original_loss": final_orig["val_loss"],
        "original_perplexity": _ppl(final_orig["val_loss"]),
        "original_by_domain": final_orig["by_domain"],
        "adapter_flops_per_token": final_new["adapter_flops_per_token"],
        "train_tokens_per_second": steady_tokens_per_second(train_curve, cfg.batch_size * cfg.seq_len),
        "forwards_per_step": rloo_samples if remix else 1,
        "load": final_new["load"],
        "val_curve": curve,
        "train_curve": train_curve,
        "adapters": str(folder / "adapters"),
    }


def _set_adapter_mode(layers, training: bool) -> None:
    for layer in layers.values():
        layer.adapter.train(training)

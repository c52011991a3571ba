"""Offloaded execution: a model whose routed experts live on disk, loaded on demand into a bounded expert cache.

Shape legend: T tokens, D model width, F expert width, E experts, S assignments (sorted by expert), N rows of one
expert.

`offload_experts(model, store_dir, capacity=..., policy=..., prefetch=...)`:
1. checks everything first (capacity, policy, store folder, expert banks, a Belady trace); on any error the model is
   untouched;
2. writes every MoE layer's experts to `store_dir/layer{l}.safetensors`, one tensor per expert and weight
   (`expert.{e}.w_gate_up`, `expert.{e}.w_down`, and the biases of clamped experts), so one expert loads alone,
   plus `manifest.json` (shapes, dtype, a CRC-32 of every tensor, the model's fingerprint);
3. replaces each layer's expert bank by an `OffloadedExperts` bank without parameters, so the resident weights are
   freed. Its forward asks the cache for the experts whose groups are non-empty — hits stay, misses are read through
   safetensors' mmap (`safe_open(...).get_tensor`) and checked against their CRC, evictions drop the tensors — and
   then runs exactly the arithmetic of the resident bank, so outputs are bit-identical to the resident model.

The cache is the simulator's (`inference/cache.py`): the same policy classes, the same step (one forward of one
layer, its experts pinned), the same per-layer or global scope, so the executor's miss count on a run equals the
simulator's on that run's trace. With `prefetch=True`, once layer l has run, the experts predicted for layer l+1
(layer l+1's router on layer l's input, or a pre-gating router's exact choice — `trace.predict_next`) are loaded into
layer l+1's cache, as the simulator does with `prefetch=True` ("pregated" = LRU with prefetch); here the loads are synchronous (the CPU executor does
not overlap them with compute; the simulator's stall model says what overlap would save). `policy="belady"` needs the
run's trace in advance (`trace=`, recorded from the same model and inputs), and refuses a trace of another model or
a run that departs from it.

Inference only: the offloaded banks hold no parameters, so nothing trains them. Outputs are bit-identical under
`torch.no_grad()` (as `generate` runs); a forward that records gradients (for the input or the routing weights)
takes the generic differentiable path, equal to the resident outputs up to rounding.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._atomic import atomic_write_bytes, atomic_write_text
from routelab._checks import check_bool, check_choice, check_int
from routelab.dispatch.gathered_swiglu import gathered_swiglu
from routelab.dispatch.grouped_swiglu import grouped_swiglu
from routelab.dispatch.local import LocalDispatcher
from routelab.dispatch.permute import make_plan
from routelab.dispatch.routed_swiglu import routed_swiglu
from routelab.experts.base import ExpertBank, ExpertFn
from routelab.experts.clamped import ClampedSwiGLUExperts
from routelab.experts.swiglu import SwiGLUExperts
from routelab.inference.cache import NEVER, POLICIES, SCOPES, Cache, CapacityError, demand, make_cache
from routelab.inference.trace import RoutingTrace, TraceError, model_fingerprint, moe_layers, predict_next
from routelab.layers.moe import MoELayer
from routelab.routing.base import RoutingDecision

STORE_FORMAT, STORE_VERSION = "routelab-expert-store", 1
MANIFEST = "manifest.json"


class StoreError(ValueError):
    """An expert store that cannot be written or read (the message names the folder or file)."""


# -- the store on disk -----------------------------------------------------------------------------------------------


def _bank_tensors(bank: ExpertBank) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
    """(kind, {weight name: [E, ...] tensor}, extra options) of a bank the executor can run."""
    if type(bank) is SwiGLUExperts:
        return "swiglu", {"w_gate_up": bank.w_gate_up, "w_down": bank.w_down}, {"fused": bool(bank.fused)}
    if type(bank) is ClampedSwiGLUExperts:
        tensors = {"w_gate_up": bank.w_gate_up, "w_down": bank.w_down}
        if bank.b_gate_up is not None:
            tensors.update(b_gate_up=bank.b_gate_up, b_down=bank.b_down)
        return "clamped", tensors, {"alpha": bank.alpha, "limit": bank.limit}
    raise TypeError(
        f"offload_experts runs SwiGLUExperts and ClampedSwiGLUExperts banks; got {type(bank).__name__}"
    )


def _crc(t: Tensor) -> int:
    return zlib.crc32(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")


class ExpertStore:
    """A folder of expert tensors written by `offload_experts` (see the module docstring for the layout)."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root, self.manifest = root, manifest
        self.layers: list[dict[str, Any]] = manifest["layers"]

    @staticmethod
    def check_target(store_dir: str | os.PathLike[str]) -> Path:
        """Refuse a store folder that is not empty or not writable (before anything is written)."""
        root = Path(store_dir)
        if root.exists() and not root.is_dir():
            raise StoreError(f"store_dir {root} is a file; give an empty or new folder")
        if root.is_dir():
            if any(root.iterdir()):
                raise StoreError(f"store_dir {root} is not empty; give an empty or new folder (routelab never "
                                 "overwrites files it did not write)")
            if not os.access(root, os.W_OK | os.X_OK):
                raise StoreError(f"store_dir {root} is not writable")
        else:
            parent = next((p for p in root.parents if p.exists()), Path("."))
            if not os.access(parent, os.W_OK | os.X_OK):
                raise StoreError(f"store_dir {root} cannot be created: {parent} is not writable")
        return root

    @classmethod
    def write(cls, model: nn.Module, root: Path) -> ExpertStore:
        layers = []
        created = not root.exists()
        written: list[Path] = []
        try:
            root.mkdir(parents=True, exist_ok=True)
            from safetensors.torch import save

            for index, layer in enumerate(moe_layers(model)):
                kind, tensors, extra = _bank_tensors(layer.experts)
                E = layer.experts.num_experts
                per_expert = {
                    f"expert.{e}.{name}": t[e].detach().to("cpu").contiguous().clone()
                    for e in range(E) for name, t in tensors.items()
                }  # fmt: skip
                path = root / f"layer{index}.safetensors"
                atomic_write_bytes(path, save(per_expert, metadata={"format": STORE_FORMAT}))
                written.append(path)
                layers.append({
                    "file": path.name, "kind": kind, "num_experts": E, "d_model": layer.d_model, "d_ff": layer.d_ff,
                    "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."), "names": list(tensors),
                    "expert_bytes": sum(t[0].numel() * t.element_size() for t in tensors.values()),
                    "crc32": {k: _crc(v) for k, v in per_expert.items()}, **extra,
                })  # fmt: skip
            manifest = {"format": STORE_FORMAT, "version": STORE_VERSION, "fingerprint": model_fingerprint(model),
                        "layers": layers}
            atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        except BaseException as exc:
            for path in written:  # only what this call wrote
                path.unlink(missing_ok=True)
            if created and root.is_dir() and not any(root.iterdir()):
                root.rmdir()
            if isinstance(exc, OSError):
                raise StoreError(f"cannot write the expert store in {root}: {exc}") from None
            raise
        return cls(root, manifest)

    def load(self, layer: int, e: int, device: torch.device) -> dict[str, Tensor]:
        """Expert e of MoE layer `layer`: its tensors, read through safetensors' mmap and checked against the CRC."""
        from safetensors import safe_open

        info = self.layers[layer]
        path = self.root / info["file"]
        out = {}
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in info["names"]:
                    key = f"expert.{e}.{name}"
                    t = f.get_tensor(key)
                    if _crc(t) != info["crc32"][key]:
                        raise StoreError(f"expert store file {path} is corrupted: tensor {key} fails its CRC-32 check")
                    out[name] = t.to(device)
        except StoreError:
            raise
        except Exception as exc:  # safetensors header errors, a missing tensor, a truncated file
            raise StoreError(f"expert store file {path} is unreadable or corrupted: {exc}") from None
        return out


# -- the executor ----------------------------------------------------------------------------------------------------


@dataclass
class LayerStats:
    requests: int = 0
    hits: int = 0
    misses: int = 0
    prefetch_loads: int = 0
    bytes_read: int = 0


@dataclass
class OffloadExecutor:
    """The caches and counters of one offloaded model. `stats[l]` per MoE layer; `resident_bytes` is the storage of
    the expert tensors held now (measured from the tensors, not computed from the manifest), `peak_resident_bytes`
    its maximum over the run."""

    store: ExpertStore
    caches: list[Cache]
    scope: str
    policy: str
    prefetch: bool
    device: torch.device
    stats: list[LayerStats] = field(default_factory=list)
    resident: dict[tuple[int, int], dict[str, Tensor]] = field(default_factory=dict)
    peak_resident_bytes: int = 0
    resident_bytes: int = 0
    _steps: list[int] = field(default_factory=list)
    _clock: int = 0
    _pending: dict[int, list[int]] = field(default_factory=dict)
    _trace_used: list[Any] | None = None

    def _key(self, layer: int, e: int) -> int:
        return e if self.scope == "layer" else layer * self._stride + e

    @property
    def _stride(self) -> int:
        return max(info["num_experts"] for info in self.store.layers)

    def _item(self, key: int, layer: int) -> tuple[int, int]:
        return (layer, key) if self.scope == "layer" else divmod(key, self._stride)

    def _time(self, layer: int) -> int:
        return self._steps[layer] if self.scope == "layer" else self._clock

    def _apply(self, layer: int, loaded: list[int], before: set[int]) -> None:
        """Drop the evicted experts' tensors, read the loaded ones, and account for memory."""
        cache = self.caches[layer]
        for key in before - cache.resident:
            tensors = self.resident.pop(self._item(key, layer))
            self.resident_bytes -= sum(t.untyped_storage().nbytes() for t in tensors.values())
        for key in loaded:
            item = self._item(key, layer)
            tensors = self.store.load(item[0], item[1], self.device)
            self.resident[item] = tensors
            nbytes = sum(t.untyped_storage().nbytes() for t in tensors.values())
            self.resident_bytes += nbytes
            self.stats[item[0]].bytes_read += nbytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    def step(self, layer: int, needed: list[int]) -> dict[int, dict[str, Tensor]]:
        """One forward of MoE layer `layer` needing experts `needed` (ascending): their tensors, after the cache
        served the step."""
        if self._trace_used is not None:
            t = self._steps[layer]
            used = self._trace_used[layer]
            if t >= len(used) or sorted(needed) != torch.as_tensor(used[t]).nonzero().flatten().tolist():
                raise TraceError(f"the run departs from the Belady trace at step {t} of MoE layer {layer}: "
                                 "record the trace from the same model and inputs")
        cache = self.caches[layer]
        before = set(cache.resident)
        try:
            missed = cache.access([self._key(layer, e) for e in needed], self._time(layer))
        except CapacityError:
            raise CapacityError(
                f"MoE layer {layer} needs {len(needed)} experts at once in this forward; the cache holds "
                f"{cache.capacity}: the step cannot run (use a larger capacity, or feed fewer tokens per forward, "
                "e.g. a shorter prefill chunk)"
            ) from None
        self._apply(layer, missed, before)
        s = self.stats[layer]
        s.requests += len(needed)
        s.misses += len(missed)
        s.hits += len(needed) - len(missed)
        out = {e: self.resident[(layer, e)] for e in needed}
        self._steps[layer] += 1
        self._clock += 1
        return out

    def after_layer(self, layer: int) -> None:
        """Issue the prefetch for the next layer that this layer's router predicted."""
        predicted = self._pending.pop(layer + 1, None)
        if predicted is None:
            return
        nl = layer + 1
        cache = self.caches[nl]
        before = set(cache.resident)
        loaded = cache.prefetch([self._key(nl, e) for e in predicted], self._time(layer) - 1)
        self._apply(nl, loaded, before)
        self.stats[nl].prefetch_loads += len(loaded)

    def totals(self) -> dict[str, float]:
        req = sum(s.requests for s in self.stats)
        hits = sum(s.hits for s in self.stats)
        return {
            "requests": req, "hits": hits, "misses": sum(s.misses for s in self.stats),
            "prefetch_loads": sum(s.prefetch_loads for s in self.stats),
            "bytes_read": sum(s.bytes_read for s in self.stats), "hit_rate": hits / req if req else 1.0,
            "peak_resident_bytes": self.peak_resident_bytes,
        }  # fmt: skip


class OffloadedExperts(ExpertBank):
    """An expert bank whose weights are in an `ExpertStore`, served by an `OffloadExecutor`'s cache. No parameters.

    Through the generic seam (`ExpertBank.forward` → `active_experts`), it asks the cache for the experts that have
    rows and runs each like the resident bank's `expert`; `OffloadDispatcher` gives a plain SwiGLU bank the resident
    fused kernel's arithmetic. Either way the outputs are the resident model's, bit for bit.
    """

    def __init__(self, executor: OffloadExecutor, layer_index: int) -> None:
        info = executor.store.layers[layer_index]
        super().__init__(info["num_experts"], info["d_model"], info["d_ff"])
        self.__dict__["executor"] = executor  # a plain attribute: the executor is not a submodule
        self.layer_index = layer_index
        self.kind = info["kind"]
        self.expert_nbytes = int(info["expert_bytes"])
        self.fused = bool(info.get("fused", False))
        self.alpha, self.limit = info.get("alpha"), info.get("limit")

    def forward(self, rows_SD: Tensor, counts_E: Tensor) -> Tensor:
        try:
            return super().forward(rows_SD, counts_E)
        finally:
            self.executor.after_layer(self.layer_index)

    def active_experts(self, experts: list[int]) -> list[ExpertFn]:
        weights = self.executor.step(self.layer_index, experts)
        return [lambda x_ND, w=weights[e]: self._expert(x_ND, w) for e in experts]

    def expert(self, x_ND: Tensor, e: int) -> Tensor:
        return self.active_experts([e])[0](x_ND)

    def _expert(self, x_ND: Tensor, w: dict[str, Tensor]) -> Tensor:
        F_ = self.d_ff
        if self.kind == "swiglu":  # experts/swiglu.py: swiglu()
            h_N2F = x_ND @ w["w_gate_up"]
            return (F.silu(h_N2F[:, :F_]) * h_N2F[:, F_:]) @ w["w_down"]
        # ClampedSwiGLUExperts.expert, in the same operation order
        h_N2F = x_ND @ w["w_gate_up"]
        if "b_gate_up" in w:
            h_N2F = h_N2F + w["b_gate_up"]
        gate_NF = h_N2F[:, :F_].clamp(max=self.limit)
        up_NF = h_N2F[:, F_:].clamp(min=-self.limit, max=self.limit)
        glu_NF = gate_NF * torch.sigmoid(gate_NF * self.alpha)
        y_ND = ((up_NF + 1) * glu_NF) @ w["w_down"]
        if "b_down" in w:
            y_ND = y_ND + w["b_down"]
        return y_ND

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer={self.layer_index}, kind={self.kind}, offloaded"


class _CachedWeights:
    """Indexable like an [E, ...] weight bank, but holds only the cached experts' tensors (for the fused kernel)."""

    requires_grad = False

    def __init__(self, weights: dict[int, dict[str, Tensor]], name: str, shape: tuple[int, ...]) -> None:
        self.weights, self.name, self.shape = weights, name, shape

    def __getitem__(self, e: int) -> Tensor:
        return self.weights[e][self.name]


class OffloadDispatcher(LocalDispatcher):
    """The local dispatcher, whose fused SwiGLU path (`dispatch/routed_swiglu.py`, the resident default) also runs an
    offloaded SwiGLU bank: the kernel indexes its weight banks by expert, and gets the cached experts' tensors."""

    def can_fuse(self, experts: nn.Module) -> bool:
        if isinstance(experts, OffloadedExperts):
            return experts.kind == "swiglu" and experts.fused
        return super().can_fuse(experts)

    def fused(self, x_TD: Tensor, decision: RoutingDecision, experts: nn.Module) -> Tensor:
        if not isinstance(experts, OffloadedExperts):
            return super().fused(x_TD, decision, experts)
        if torch.is_grad_enabled() and (x_TD.requires_grad or decision.weight.requires_grad):
            # The fused kernel's autograd saves whole [E, ...] banks, which an offloaded bank does not have: take the
            # differentiable generic path (equal to the resident outputs up to rounding, not bit for bit).
            rows_SD, counts_E, plan = self.dispatch(x_TD, decision)
            return self.combine(experts(rows_SD, counts_E), plan)
        E, D, F_ = experts.num_experts, experts.d_model, experts.d_ff
        executor, layer = experts.executor, experts.layer_index
        try:
            # NOTE: the same choice of kernel as LocalDispatcher.fused makes for the resident bank, so the arithmetic,
            # and the outputs, are the resident model's.
            grouped = self.takes_grouped_path(decision.num_assignments, E, x_TD)
            if grouped and not self.gathers_first(decision.num_assignments, D, F_):
                plan = make_plan(decision)
                sizes = plan.group_sizes_E.tolist()
                needed = [e for e, n in enumerate(sizes) if n]
                weights = executor.step(layer, needed)
                if not needed:
                    return x_TD.new_zeros(x_TD.shape)
                # The cached experts as a bank in expert order: the same groups, in the same order, as the resident's.
                w_gate_up = torch.stack([weights[e]["w_gate_up"] for e in needed])
                w_down = torch.stack([weights[e]["w_down"] for e in needed])
                sizes_N = plan.group_sizes_E[torch.tensor(needed, device=x_TD.device)]
                return grouped_swiglu(x_TD, plan.token_S, plan.weight_S, sizes_N, w_gate_up, w_down)
            if self.takes_decode_path(decision.num_assignments, D, F_):
                needed = torch.unique(decision.expert_index).tolist()
                weights = executor.step(layer, needed)
                local_E = torch.zeros(E, dtype=torch.long, device=x_TD.device)
                local_E[needed] = torch.arange(len(needed), device=x_TD.device)
                w_gate_up = x_TD.new_zeros(0, D, 2 * F_)
                w_down = x_TD.new_zeros(0, F_, D)
                if needed:
                    w_gate_up = torch.stack([weights[e]["w_gate_up"] for e in needed])
                    w_down = torch.stack([weights[e]["w_down"] for e in needed])
                return gathered_swiglu(x_TD, decision.token_index, local_E[decision.expert_index], decision.weight,
                                       w_gate_up, w_down)
            plan = make_plan(decision)
            sizes = plan.group_sizes_E.tolist()
            weights = executor.step(layer, [e for e, n in enumerate(sizes) if n])
            return routed_swiglu(x_TD, plan.token_S, plan.weight_S, sizes, _CachedWeights(weights, "w_gate_up",
                                 (E, D, 2 * F_)), _CachedWeights(weights, "w_down", (E, F_, D)))
        finally:
            executor.after_layer(layer)


# -- the entry point -------------------------------------------------------------------------------------------------


def _min_capacity(layer: MoELayer) -> int:
    k = getattr(layer.router, "k", None)
    return int(k) if isinstance(k, int) and not isinstance(k, bool) else 1


@torch.no_grad()
def offload_experts(
    model: nn.Module,
    store_dir: str | os.PathLike[str],
    *,
    capacity: int,
    policy: str = "lru",
    prefetch: bool = False,
    scope: str = "layer",
    trace: RoutingTrace | None = None,
) -> OffloadExecutor:
    """Move every MoE layer's routed experts of `model` to `store_dir` and serve them from a cache; returns the
    executor (counters: `executor.totals()`, `executor.stats`, `executor.peak_resident_bytes`).

    capacity: experts held per MoE layer (scope="layer", the default) or in all (scope="global"); at least the
        experts one token needs (the router's k). policy: "lru", "lfu", "arc" or "belady" (needs `trace`, the
        routing trace of the run to come, recorded from this model). prefetch: load the experts predicted for the
        next layer after each layer (Pre-gated MoE; exact for the pre-gating router).
    """
    check_int("capacity", capacity, 1)
    check_choice("policy", policy, tuple(p for p in POLICIES if p != "pregated"))
    check_bool("prefetch", prefetch)
    check_choice("scope", scope, SCOPES)
    if prefetch and policy == "belady":
        raise ValueError("prefetch=True does not combine with policy 'belady' (the optimum for demand loading)")
    layers = moe_layers(model)
    if not layers:
        raise ValueError("offload_experts needs a model with routelab MoE layers (a routelab LM or a model patched "
                         "with routelab.interop.hf.patch_model); found none")
    for i, layer in enumerate(layers):
        if isinstance(layer.experts, OffloadedExperts):
            raise ValueError(f"MoE layer {i} is already offloaded")
        _bank_tensors(layer.experts)  # TypeError for a bank the executor cannot run
        if type(layer.dispatcher) is not LocalDispatcher:
            raise TypeError(f"MoE layer {i} uses a {type(layer.dispatcher).__name__}; offloading runs layers with the "
                            "local dispatcher (all experts in this process)")
        need = _min_capacity(layer)
        if capacity < need:
            raise CapacityError(f"capacity={capacity} is below the {need} experts one token needs at MoE layer {i} "
                                f"(k={need}): no step could run; use capacity >= {need}")
    if policy == "belady":
        if trace is None:
            raise ValueError("policy='belady' needs trace=: the routing trace of the run to come (record it with "
                             "routelab.inference.record_trace or a TraceRecorder on this model and inputs)")
        trace.check_model(model)
    elif trace is not None:
        raise ValueError("trace= is only used by policy='belady'")
    root = ExpertStore.check_target(store_dir)
    device = layers[0].experts.w_gate_up.device

    store = ExpertStore.write(model, root)
    L = len(layers)
    next_use = None
    trace_used = None
    if policy == "belady":
        d = demand(trace)
        trace_used = d.used
        next_use = _belady_next_use(d.used, scope, max(trace.num_experts), L)
    if scope == "layer":
        caches = [make_cache(policy, capacity, next_use=None if next_use is None else next_use(i)) for i in range(L)]
    else:
        pool = make_cache(policy, capacity, next_use=None if next_use is None else next_use(None))
        caches = [pool] * L
    executor = OffloadExecutor(store=store, caches=caches, scope=scope, policy=policy, prefetch=prefetch,
                               device=device, stats=[LayerStats() for _ in range(L)], _steps=[0] * L)
    executor._trace_used = trace_used
    for i, layer in enumerate(layers):
        layer.experts = OffloadedExperts(executor, i)
        layer.dispatcher = OffloadDispatcher(decode_fast_path=layer.dispatcher.decode_fast_path)
    if prefetch:
        _install_prefetch_hooks(executor, layers)
    return executor


def _belady_next_use(used, scope: str, stride: int, L: int):
    from routelab.inference.cache import _next_use_tables

    nxt = _next_use_tables(used)
    if scope == "layer":
        return lambda i: (lambda e, t: int(nxt[i][t, e]))

    def factory(_):
        def nu(item, g):
            layer, e = divmod(item, stride)
            t, now = divmod(g, L)
            n = int(nxt[layer][t, e]) if layer <= now else (t if used[layer][t, e] else int(nxt[layer][t, e]))
            return NEVER if n == NEVER else n * L + layer

        return nu

    return factory


def _install_prefetch_hooks(executor: OffloadExecutor, layers: list[MoELayer]) -> None:
    """After layer l's router decides, remember the prediction for layer l+1; the bank issues it once layer l ran."""
    for i in range(len(layers) - 1):
        router, next_router = layers[i].router, layers[i + 1].router

        def hook(module, args, kwargs, decision, i=i, router=router, next_router=next_router):
            if getattr(executor, "_predicting", False):
                return
            x_TD = args[0] if args else kwargs["x_TD"]
            ctx = args[1] if len(args) > 1 else kwargs.get("ctx")
            executor._predicting = True
            try:
                choice = predict_next(router, next_router, x_TD, ctx, decision)
            finally:
                executor._predicting = False
            executor._pending[i + 1] = choice.any(0).nonzero().flatten().tolist()

        router.register_forward_hook(hook, with_kwargs=True)

"""Routing traces: what every MoE layer of a model chose, token by token, in the order the model ran.

A trace records what the model did, so that the cache simulator (`inference/cache.py`) can replay it under any
policy and capacity, and the offloaded executor (`inference/offload.py`) can be checked against that replay.

Shape legend: N tokens in the trace, K expert slots per token (padded), P predicted slots per token.

File layout (`save_trace` / `load_trace`; one safetensors file, no pickle):

| tensor                 | dtype       | shape       | meaning                                                        |
|------------------------|-------------|-------------|----------------------------------------------------------------|
| `token_ids`            | int32       | [N]         | input token ids, in the order the model processed them         |
| `sequence_ids`         | int32       | [N]         | which sequence each token belongs to (sequence boundaries)     |
| `positions`            | int32       | [N]         | position of the token in its sequence                          |
| `step_offsets`         | int64       | [steps + 1] | tokens [off[i], off[i+1]) went through the model in forward i  |
| `layers.{l}.experts`   | int16/int32 | [N, K_l]    | selected expert ids of MoE layer l, -1 where a token has fewer |
| `layers.{l}.weights`   | float32     | [N, K_l]    | their combine weights, 0 on padding slots                      |
| `layers.{l}.predicted` | int16/int32 | [N, P_l]    | optional, l ≥ 1: experts of layer l predicted one layer early  |

Token order is decode order: forward by forward, and inside a forward of shape [B, L] row by row (b-major), so a
prefill forward is one step of B·L tokens and every KV-cached decode forward one step of B tokens. Ids are int16
when every layer has at most 32767 experts, else int32. Slots of one token are in ascending expert id.
Metadata (strings): `format` = "routelab-trace", `version` = "1", `num_experts` and `expert_bytes` (JSON lists, one
entry per MoE layer; bytes of one expert's weights) and `model_fingerprint` (SHA-256 of the MoE layers' shapes and
router weights: a trace replayed against a different model is refused).

Predictions (Pre-gated MoE, Hwang et al. 2024): at layer l the experts of layer l+1 are predicted by applying
layer l+1's router to layer l's input; a pre-gating router (`routing/pregate.py`) hands its exact next-layer choice
on instead, so its predictions equal the selections by construction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from routelab._atomic import atomic_write_bytes
from routelab._checks import check_bool, check_int
from routelab.layers.moe import MoELayer
from routelab.routing.base import RoutingContext, RoutingDecision

FORMAT, VERSION = "routelab-trace", "1"


class TraceError(ValueError):
    """A trace file that is not a routelab trace, is corrupted, or does not belong to the model it is used with."""


@dataclass(frozen=True)
class RoutingTrace:
    """A routing trace in memory (numpy arrays; see the module docstring for the layout)."""

    token_ids: np.ndarray
    sequence_ids: np.ndarray
    positions: np.ndarray
    step_offsets: np.ndarray
    experts: list[np.ndarray]
    weights: list[np.ndarray]
    num_experts: list[int]
    expert_bytes: list[int]
    model_fingerprint: str = ""
    predicted: list[np.ndarray | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        N, L = len(self.token_ids), len(self.experts)
        for name in ("sequence_ids", "positions"):
            if len(getattr(self, name)) != N:
                raise TraceError(f"trace {name} has {len(getattr(self, name))} entries, token_ids {N}")
        off = self.step_offsets
        if off.ndim != 1 or len(off) < 1 or off[0] != 0 or off[-1] != N or (np.diff(off) < 0).any():
            raise TraceError(f"trace step_offsets must rise from 0 to the number of tokens ({N})")
        if not (len(self.weights) == len(self.num_experts) == len(self.expert_bytes) == L):
            raise TraceError("trace layers disagree: experts, weights, num_experts and expert_bytes need one per layer")
        if not self.predicted:
            object.__setattr__(self, "predicted", [None] * L)
        if len(self.predicted) != L:
            raise TraceError(f"trace has {len(self.predicted)} predicted entries for {L} layers")
        for layer, (ids, w, E) in enumerate(zip(self.experts, self.weights, self.num_experts)):
            if ids.ndim != 2 or ids.shape[0] != N or w.shape != ids.shape:
                raise TraceError(f"trace layer {layer}: experts {ids.shape} and weights {w.shape} must be [{N}, K]")
            if ids.size and (ids.min() < -1 or ids.max() >= E):
                raise TraceError(
                    f"trace layer {layer}: expert ids must lie in [-1, {E}), got [{ids.min()}, {ids.max()}]"
                )
        for layer, pred in enumerate(self.predicted):
            E = self.num_experts[layer]
            if pred is not None and (pred.ndim != 2 or pred.shape[0] != N or (pred.size and pred.max() >= E)):
                raise TraceError(f"trace layer {layer}: predicted ids must be [{N}, P] in [-1, {E})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_layers(self) -> int:
        return len(self.experts)

    @property
    def num_steps(self) -> int:
        return len(self.step_offsets) - 1

    def step_of_token(self) -> np.ndarray:
        """int64 [N]: the forward (step) each token went through."""
        return np.repeat(np.arange(self.num_steps), np.diff(self.step_offsets))

    def per_token(self) -> RoutingTrace:
        """The same trace with every token its own step (what a one-token-at-a-time decoder would run)."""
        return _replace(self, step_offsets=np.arange(self.num_tokens + 1, dtype=np.int64))

    def check_model(self, model: nn.Module) -> None:
        """Raise a TraceError unless this trace was recorded from `model` (same MoE layers, experts and routers)."""
        layers = moe_layers(model)
        if [layer.router.num_experts for layer in layers] != self.num_experts:
            raise TraceError(
                f"the trace is from a different model: it has {self.num_layers} MoE layers with experts "
                f"{self.num_experts}, the model {len(layers)} with {[layer.router.num_experts for layer in layers]}"
            )
        if self.model_fingerprint and self.model_fingerprint != model_fingerprint(model):
            raise TraceError("the trace is from a different model: its router weights differ from this model's")


def _replace(trace: RoutingTrace, **changes) -> RoutingTrace:
    fields = {name: getattr(trace, name) for name in trace.__dataclass_fields__}
    return RoutingTrace(**{**fields, **changes})


# -- the model side -------------------------------------------------------------------------------------------------


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of a routelab LM or a patched Hugging Face model, in forward (module) order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def expert_bytes(layer: MoELayer) -> int:
    """Bytes of one routed expert's weights (every [E, ...] tensor of the bank, one row)."""
    bank = layer.experts
    stored = getattr(bank, "expert_nbytes", None)  # an offloaded bank knows it without holding the weights
    if stored is not None:
        return int(stored)
    return sum(t[0].numel() * t.element_size() for t in bank.parameters(recurse=False) if t.dim() >= 1)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every MoE layer's expert count and shape and its router's state (parameters and buffers)."""
    h = hashlib.sha256()
    for layer in moe_layers(model):
        h.update(f"{layer.router.num_experts},{layer.d_model},{layer.d_ff};".encode())
        for name, value in sorted(layer.router.state_dict().items()):
            h.update(name.encode())
            h.update(value.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _ids_dtype(num_experts: Sequence[int]) -> np.dtype:
    return np.dtype(np.int16) if max(num_experts, default=1) <= np.iinfo(np.int16).max else np.dtype(np.int32)


def _padded(decision: RoutingDecision, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """A decision as [T, K] ids (ascending per token, -1 padding) and weights (0 padding)."""
    T = decision.num_tokens
    tok = decision.token_index.cpu().numpy()
    exp = decision.expert_index.cpu().numpy()
    w = decision.weight.detach().float().cpu().numpy()
    order = np.lexsort((exp, tok))
    tok, exp, w = tok[order], exp[order], w[order]
    counts = np.bincount(tok, minlength=T)
    K = int(counts.max()) if T and len(tok) else 0
    slot = np.arange(len(tok)) - np.repeat(np.cumsum(counts) - counts, counts)
    ids = np.full((T, K), -1, dtype=dtype)
    weights = np.zeros((T, K), dtype=np.float32)
    ids[tok, slot], weights[tok, slot] = exp, w
    return ids, weights


def _padded_sets(choice_TE: Tensor, dtype: np.dtype) -> np.ndarray:
    """A boolean [T, E] choice as [T, P] ascending ids with -1 padding."""
    tok, exp = (t.cpu().numpy() for t in choice_TE.nonzero(as_tuple=True))
    T = choice_TE.shape[0]
    counts = np.bincount(tok, minlength=T)
    P = int(counts.max()) if len(tok) else 0
    slot = np.arange(len(tok)) - np.repeat(np.cumsum(counts) - counts, counts)
    out = np.full((T, P), -1, dtype=dtype)
    out[tok, slot] = exp
    return out


def predict_next(router: nn.Module, next_router: nn.Module, x_TD: Tensor, ctx: RoutingContext | None,
                 decision: RoutingDecision) -> Tensor:
    """Boolean [T, E_next]: the experts of the next MoE layer predicted from this layer's input x_TD.

    A router that decides the next layer's routing itself (`next_layer_choice`, the pre-gating router) gives it
    exactly; otherwise the next layer's router is applied to this layer's input (Pre-gated MoE's prediction).
    """
    exact = getattr(router, "next_layer_choice", None)
    if exact is not None and type(next_router) is type(router):
        return exact(decision, next_router)
    ctx = (ctx or RoutingContext()).replace(state=decision.state)
    if ctx.layer_index is not None:
        ctx = ctx.replace(layer_index=ctx.layer_index + 1)
    guess = next_router.forward(x_TD, ctx)  # .forward: no hooks fire (recorders and executors watch __call__)
    choice = torch.zeros(x_TD.shape[0], next_router.num_experts, dtype=torch.bool, device=x_TD.device)
    choice[guess.token_index, guess.expert_index] = True
    return choice


class TraceRecorder:
    """Records every forward of `model` into a trace while active (`with TraceRecorder(model) as rec: ...`).

    Hooks each MoE layer's router (the router sees the layer's input rows and returns the decision) and the
    model's forward (for the token ids). Each model forward is one step. A forward continues the previous one's
    sequences when it has the same batch size and one token per row (KV-cached decoding); otherwise its rows start
    new sequences. Call `new_sequences()` to force the next forward to start new ones. `predict=True` also records
    each layer's prediction of the next layer's experts (see `predict_next`), which costs one extra router call.
    """

    def __init__(self, model: nn.Module, *, predict: bool = True) -> None:
        check_bool("predict", predict)
        self.model, self.predict = model, predict
        self.layers = moe_layers(model)
        if not self.layers:
            raise ValueError("record_trace needs a model with routelab MoE layers (a routelab LM or a model patched "
                             "with routelab.interop.hf.patch_model); found none")
        self._dtype = _ids_dtype([layer.router.num_experts for layer in self.layers])
        self._handles: list = []
        self._busy = False
        self._fresh = True
        self._last_batch: int | None = None
        self._next_seq = 0
        self._seq_rows: np.ndarray = np.zeros(0, dtype=np.int32)
        self._pos_rows: np.ndarray = np.zeros(0, dtype=np.int32)
        self.tokens: list[np.ndarray] = []
        self.seqs: list[np.ndarray] = []
        self.pos: list[np.ndarray] = []
        self.steps: list[int] = [0]
        self.ids: list[list[np.ndarray]] = [[] for _ in self.layers]
        self.w: list[list[np.ndarray]] = [[] for _ in self.layers]
        self.pred: list[list[np.ndarray]] = [[] for _ in self.layers]

    def new_sequences(self) -> None:
        self._fresh = True

    def __enter__(self) -> TraceRecorder:
        self._handles.append(self.model.register_forward_pre_hook(self._on_model, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.router.register_forward_hook(self._router_hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_model(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", kwargs.get("ids", args[0] if args else None))
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise ValueError("record_trace: the model's forward must receive token ids [B, L] (input_ids)")
        B, L = ids.shape
        if self._fresh or B != self._last_batch or L != 1:
            self._seq_rows = np.arange(self._next_seq, self._next_seq + B, dtype=np.int32)
            self._next_seq += B
            pos = np.tile(np.arange(L, dtype=np.int32), B)
            self._pos_rows = pos.reshape(B, L)[:, -1] + 1
        else:
            pos = self._pos_rows.copy()
            self._pos_rows = self._pos_rows + 1
        self._fresh, self._last_batch = False, B
        self.tokens.append(ids.reshape(-1).cpu().numpy().astype(np.int32))
        self.seqs.append(np.repeat(self._seq_rows, L))
        self.pos.append(pos.astype(np.int32))
        self.steps.append(self.steps[-1] + B * L)

    def _router_hook(self, i: int):
        def hook(router, args, kwargs, decision):
            if self._busy:  # a prediction's own router call
                return
            ids, w = _padded(decision, self._dtype)
            self.ids[i].append(ids)
            self.w[i].append(w)
            if self.predict and i + 1 < len(self.layers):
                x_TD = args[0] if args else kwargs["x_TD"]
                ctx = args[1] if len(args) > 1 else kwargs.get("ctx")
                self._busy = True
                try:
                    with torch.no_grad():
                        choice = predict_next(router, self.layers[i + 1].router, x_TD, ctx, decision)
                finally:
                    self._busy = False
                self.pred[i + 1].append(_padded_sets(choice, self._dtype))

        return hook

    def trace(self) -> RoutingTrace:
        """The trace of every forward recorded so far."""
        N = self.steps[-1]
        for i, chunks in enumerate(self.ids):
            if sum(len(c) for c in chunks) != N:
                raise ValueError(
                    f"record_trace: MoE layer {i} routed {sum(len(c) for c in chunks)} tokens over the recorded "
                    f"forwards, the model received {N}; was a layer called outside the model's forward?"
                )
        cat_int = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dtype=dt)  # noqa: E731
        predicted = [None] + [_stack_padded(p, self._dtype) if self.predict else None for p in self.pred[1:]]
        return RoutingTrace(
            token_ids=cat_int(self.tokens, np.int32),
            sequence_ids=cat_int(self.seqs, np.int32),
            positions=cat_int(self.pos, np.int32),
            step_offsets=np.asarray(self.steps, dtype=np.int64),
            experts=[_stack_padded(c, self._dtype) for c in self.ids],
            weights=[_stack_padded(c, np.float32, fill=0) for c in self.w],
            num_experts=[layer.router.num_experts for layer in self.layers],
            expert_bytes=[expert_bytes(layer) for layer in self.layers],
            model_fingerprint=model_fingerprint(self.model),
            predicted=predicted,
        )


def _stack_padded(chunks: list[np.ndarray], dtype, fill=-1) -> np.ndarray:
    K = max((c.shape[1] for c in chunks), default=0)
    N = sum(c.shape[0] for c in chunks)
    out = np.full((N, K), fill, dtype=dtype)
    row = 0
    for c in chunks:
        out[row : row + c.shape[0], : c.shape[1]] = c
        row += c.shape[0]
    return out


@torch.no_grad()
def record_trace(
    model: nn.Module, sequences: Iterable[Tensor | Sequence[int]], *, batch_size: int = 1, predict: bool = True
) -> RoutingTrace:
    """Run `model` (eval mode, no gradients) over token sequences and return the routing trace.

    sequences: 1-D token id sequences; `batch_size` consecutive sequences of equal length go through one forward
    (one step), others alone. Works for routelab LMs (`forward(ids)`) and patched Hugging Face causal LMs
    (`forward(input_ids=...)`). The model's training mode is restored afterwards. To trace generation, wrap the
    generation loop in a `TraceRecorder` instead.
    """
    check_int("batch_size", batch_size, 1)
    seqs = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]
    if not seqs or any(s.numel() == 0 for s in seqs):
        raise ValueError("record_trace needs at least one sequence, each with at least one token")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with TraceRecorder(model, predict=predict) as rec:
            i = 0
            while i < len(seqs):
                batch = [seqs[i]]
                while len(batch) < batch_size and i + len(batch) < len(seqs):
                    if len(seqs[i + len(batch)]) != len(seqs[i]):
                        break
                    batch.append(seqs[i + len(batch)])
                i += len(batch)
                rec.new_sequences()
                ids = torch.stack(batch).to(device)
                if _is_hf(model):
                    model(input_ids=ids, use_cache=False)
                else:
                    model(ids)
        return rec.trace()
    finally:
        model.train(was_training)


def _is_hf(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


# -- files ----------------------------------------------------------------------------------------------------------


def save_trace(trace: RoutingTrace, path: str | Path) -> Path:
    """Write `trace` to a safetensors file (atomically); returns the path."""
    from safetensors.numpy import save

    tensors = {
        "token_ids": trace.token_ids.astype(np.int32),
        "sequence_ids": trace.sequence_ids.astype(np.int32),
        "positions": trace.positions.astype(np.int32),
        "step_offsets": trace.step_offsets.astype(np.int64),
    }
    dtype = _ids_dtype(trace.num_experts)
    for layer in range(trace.num_layers):
        tensors[f"layers.{layer}.experts"] = trace.experts[layer].astype(dtype)
        tensors[f"layers.{layer}.weights"] = trace.weights[layer].astype(np.float32)
        if trace.predicted[layer] is not None:
            tensors[f"layers.{layer}.predicted"] = trace.predicted[layer].astype(dtype)
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "num_experts": json.dumps([int(e) for e in trace.num_experts]),
        "expert_bytes": json.dumps([int(b) for b in trace.expert_bytes]),
        "model_fingerprint": trace.model_fingerprint,
    }
    # safetensors refuses empty tensors' zero-size buffers in no case, but keep contiguous copies for it.
    path = Path(path)
    atomic_write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata))
    return path


def load_trace(path: str | Path) -> RoutingTrace:
    """Read a trace written by `save_trace`; a file that is not one raises a TraceError naming it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace file {path} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise TraceError(f"{path} is not a routelab trace (metadata format={meta.get('format')!r})")
            if meta.get("version") != VERSION:
                raise TraceError(f"{path}: trace version {meta.get('version')!r} is not supported (want {VERSION})")
            keys = set(f.keys())
            num_experts = [int(e) for e in json.loads(meta["num_experts"])]
            nbytes = [int(b) for b in json.loads(meta["expert_bytes"])]
            L = len(num_experts)
            get = f.get_tensor
            return RoutingTrace(
                token_ids=get("token_ids"),
                sequence_ids=get("sequence_ids"),
                positions=get("positions"),
                step_offsets=get("step_offsets"),
                experts=[get(f"layers.{layer}.experts") for layer in range(L)],
                weights=[get(f"layers.{layer}.weights") for layer in range(L)],
                num_experts=num_experts,
                expert_bytes=nbytes,
                model_fingerprint=meta.get("model_fingerprint", ""),
                predicted=[get(f"layers.{layer}.predicted") if f"layers.{layer}.predicted" in keys else None
                           for layer in range(L)],
            )
    except TraceError:
        raise
    except Exception as exc:  # safetensors header errors, missing tensors, bad JSON
        raise TraceError(f"{path} is not a readable routelab trace: {exc}") from None

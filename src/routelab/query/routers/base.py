"""The query-router contract (requests -> whole models) and its registry, apart from the token routers.

Shapes: N prompts, M models, D embedding width.

Every router, after `fit(outcomes)`:
- `name: str` (its registry name), `model_names: list[str]` (the pool it was trained on, column order of every
  [N, M] array), `knob_name: str` — "threshold" or "willingness_to_pay" — such that
  `route(prompts, **{router.knob_name: value})` is valid (the gateway's `router-<name>-<knob>` model names rely on it);
- `predict(prompts) -> float [N, M]`: predicted scores (higher is better; each router states its scale);
- `route(prompts, *, willingness_to_pay=None, threshold=None) -> int64 [N]` model indices:
  * willingness_to_pay = λ >= 0: argmax over models of predicted score − λ · cost, cost being each model's mean
    dollars per query in the training data (ties go to the cheaper model). λ is the quality one would give up to
    save one dollar per query: 0 buys the best predicted quality whatever it costs; a large λ buys the cheapest.
  * threshold = τ in [0, 1], for two models (RouteLLM's knob): the strong model (higher mean training score) when
    its predicted win rate `strong_win_rate(prompts)` >= τ, else the weak one. The win rate is
    (1 + predicted score of strong − predicted score of weak) / 2 unless a router says otherwise; `calibrate()`
    turns "send x% of queries to the strong model" into τ. Cascades use τ as their escalation threshold.
  * neither: the router's default knob (λ = 0, τ = 0.5).
- `calls(prompts, **knob) -> bool [N, M]`: which models a query calls (one for routers, several for cascades), so
  that evaluation charges every call;
- `save(path)`: a folder with `router.json` (name, options, model names, costs, encoder configuration including a
  tf-idf vocabulary) and `arrays.safetensors` (every array, encoder arrays under `encoder.`). Nothing is pickled:
  scikit-learn objects are stored as their arrays. `routelab.query.load_router(path)` rebuilds it, so that
  `load_router(path).route(["text"], ...)` works without the training data.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np

from routelab._atomic import atomic_write_bytes, atomic_write_text
from routelab._checks import check_choice, check_int, check_number
from routelab.query.encoders import ENCODERS, Encoder, create_encoder, encoder_from_state
from routelab.query.outcomes import Outcomes

FORMAT = "routelab-query-router"
FORMAT_VERSION = 1
KNOBS = ("willingness_to_pay", "threshold")


class NotFittedError(RuntimeError):
    pass


class QueryRouter:
    """Base class: embeds prompts with its encoder, learns per-model scores, routes under a cost knob.

    Subclasses implement `_fit(x_ND, outcomes)`, `_predict(x_ND, prompts) -> [N, M]`, and `_arrays()` /
    `_set_arrays()` for what `save` stores; options are keyword-only constructor arguments, validated there.
    """

    name = ""
    uses_encoder = True
    needs_test_labels = False  # True: the router reads true outcomes (oracle): evaluation flags it an upper bound

    def __init__(self, *, encoder: str = "tfidf", seed: int = 0) -> None:
        check_choice("encoder", encoder, ENCODERS)
        check_int("seed", seed, 0)
        self.encoder_name, self.seed = encoder, seed
        self.encoder: Encoder | None = None
        self.model_names: list[str] = []
        self.cost_M: np.ndarray | None = None
        self.strong: int = 0

    # -- options and knobs -------------------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        params = inspect.signature(type(self).__init__).parameters
        names = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
        return {p: (self.encoder_name if p == "encoder" else getattr(self, p)) for p in names}

    @property
    def knob_name(self) -> str:
        return "threshold" if len(self.model_names) == 2 else "willingness_to_pay"

    def _check_fitted(self) -> None:
        if not self.model_names:
            raise NotFittedError(f"router {self.name!r} is not fitted: call fit(outcomes) or load_router(path)")

    # -- fit / predict / route ---------------------------------------------------------------------------------
    def fit(self, outcomes: Outcomes, *, encoder: Encoder | None = None) -> QueryRouter:
        """Learn from `outcomes`; `encoder`, when given, is an already-fitted encoder shared between routers."""
        if outcomes.num_prompts < 2 or outcomes.num_models < 1:
            raise ValueError(f"fit needs at least 2 prompts and 1 model, got {outcomes.num_prompts} prompts")
        self.model_names = list(outcomes.model_names)
        self.cost_M = model_costs(outcomes)
        self.strong = outcomes.strongest_model()
        x_ND = None
        if self.uses_encoder:
            if encoder is not None and encoder.name != self.encoder_name:
                raise ValueError(f"encoder {encoder.name!r} given to a router built with encoder={self.encoder_name!r}")
            self.encoder = encoder or create_encoder(self.encoder_name, seed=self.seed).fit(outcomes.prompts)
            x_ND = self.encoder.encode(outcomes.prompts)
        self._fit(x_ND, outcomes)
        return self

    def embed(self, prompts: list[str]) -> np.ndarray | None:
        return self.encoder.encode(list(prompts)) if self.uses_encoder else None

    def predict(self, prompts: list[str], *, x_ND: np.ndarray | None = None) -> np.ndarray:
        """Predicted scores [N, M] (`x_ND`: embeddings already computed by this router's encoder)."""
        self._check_fitted()
        prompts = _check_prompts(prompts)
        if x_ND is None:
            x_ND = self.embed(prompts)
        return np.asarray(self._predict(x_ND, prompts), dtype=np.float64)

    def strong_win_rate(self, prompts: list[str], *, scores_NM: np.ndarray | None = None) -> np.ndarray:
        """Predicted probability [N] that the strong model's answer beats the weak one's (two-model pools)."""
        self._check_fitted()
        if len(self.model_names) != 2:
            raise ValueError(f"threshold routing needs a two-model pool; this router knows {len(self.model_names)} "
                             "models: use willingness_to_pay")
        s = self.predict(prompts) if scores_NM is None else scores_NM
        weak = 1 - self.strong
        return np.clip((1.0 + s[:, self.strong] - s[:, weak]) / 2.0, 0.0, 1.0)

    def route(self, prompts: list[str], *, willingness_to_pay: float | None = None,
              threshold: float | None = None, scores_NM: np.ndarray | None = None) -> np.ndarray:
        """Model index [N] per prompt (see the module docstring for the knobs). `scores_NM`: this router's
        `predict(prompts)` when the caller already has it (evaluation sweeps a knob over one prediction)."""
        self._check_fitted()
        if willingness_to_pay is not None and threshold is not None:
            raise ValueError("give willingness_to_pay or threshold, not both")
        s = self.predict(prompts) if scores_NM is None else scores_NM
        if threshold is not None:
            check_number("threshold", threshold, low=0.0, high=1.0)
            win = self.strong_win_rate(prompts, scores_NM=s)
            return np.where(win >= threshold, self.strong, 1 - self.strong).astype(np.int64)
        lam = 0.0 if willingness_to_pay is None else willingness_to_pay
        check_number("willingness_to_pay", lam, low=0.0)
        return argmax_cheapest(s - lam * self.cost_M[None, :], self.cost_M)

    def calls(self, prompts: list[str], **knob: Any) -> np.ndarray:
        """Which models each query calls, bool [N, M]; a router calls only the one it routes to."""
        choice_N = self.route(prompts, **knob)
        calls_NM = np.zeros((len(choice_N), len(self.model_names)), dtype=bool)
        calls_NM[np.arange(len(choice_N)), choice_N] = True
        return calls_NM

    # -- subclass hooks ----------------------------------------------------------------------------------------
    def _fit(self, x_ND: np.ndarray | None, outcomes: Outcomes) -> None:
        raise NotImplementedError

    def _predict(self, x_ND: np.ndarray | None, prompts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def _arrays(self) -> dict[str, np.ndarray]:
        return {}

    def _set_arrays(self, arrays: dict[str, np.ndarray], extra: dict) -> None:
        pass

    def _extra(self) -> dict:
        return {}

    # -- save / load -------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the router folder (router.json + arrays.safetensors); nothing pickled."""
        from safetensors.numpy import save as st_save

        self._check_fitted()
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ValueError(f"router folder {path} exists and is not a folder")
        if path.is_dir() and any(path.iterdir()) and not (path / "router.json").is_file():
            raise ValueError(f"router folder {path} is not empty and holds no router.json: refusing to write there")
        arrays = {f"router.{k}": np.ascontiguousarray(v) for k, v in self._arrays().items()}
        encoder_config = None
        if self.uses_encoder:
            encoder_config, enc_arrays = self.encoder.state()
            arrays.update({f"encoder.{k}": np.ascontiguousarray(v) for k, v in enc_arrays.items()})
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "router": self.name, "options": self.options(),
                "model_names": self.model_names, "cost_M": [float(c) for c in self.cost_M],
                "strong": self.strong, "encoder": encoder_config, "extra": self._extra()}
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path / "arrays.safetensors", st_save(arrays) if arrays else st_save({"empty": np.zeros(1)}))
        atomic_write_text(path / "router.json", json.dumps(meta, indent=1) + "\n")
        return path


def argmax_cheapest(u_NM: np.ndarray, cost_M: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """Row-wise argmax; among ties (within `tol`) the cheaper model, then the lower index: deterministic."""
    best_N = u_NM.max(axis=1, keepdims=True)
    tied_NM = u_NM >= best_N - tol
    order = np.lexsort((np.arange(len(cost_M)), cost_M))  # cheapest first
    rank_M = np.empty_like(order)
    rank_M[order] = np.arange(len(order))
    return np.where(tied_NM, rank_M[None, :], len(order)).argmin(axis=1).astype(np.int64)


def model_costs(outcomes: Outcomes) -> np.ndarray:
    """Mean dollars per query of each model [M]; without costs, 1 for the strongest model and 0 for the others
    when there are two (cost = share of calls to the strong model, RouteLLM's axis), else an error."""
    if outcomes.costs_NM is not None:
        return outcomes.costs_NM.mean(axis=0)
    if outcomes.num_models <= 2:
        cost = np.zeros(outcomes.num_models)
        cost[outcomes.strongest_model()] = 1.0
        return cost
    raise ValueError(f"these outcomes of {outcomes.num_models} models have no costs: give a price table "
                     "(load_outcomes(..., prices='models.json'); routelab query-eval --prices FILE)")


def unit_costs(outcomes: Outcomes) -> Outcomes:
    """`outcomes` with costs; two-model data without costs gets cost 1 per call to the strong model."""
    if outcomes.costs_NM is not None:
        return outcomes
    cost_M = model_costs(outcomes)
    return Outcomes(outcomes.prompts, outcomes.model_names, outcomes.scores_NM,
                    np.repeat(cost_M[None, :], outcomes.num_prompts, axis=0), outcomes.categories, outcomes.sources,
                    outcomes.costs_estimated, outcomes.notes)


def _check_prompts(prompts: list[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got one string (wrap it in a list)")
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a string, got {type(p).__name__}")
    return prompts


# -- registry ------------------------------------------------------------------------------------------------
_ROUTERS: dict[str, type[QueryRouter]] = {}


def register_query_router(name: str):
    """Class decorator: register a QueryRouter subclass under `name` (once)."""

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, QueryRouter)):
            raise TypeError(f"register_query_router({name!r}) expects a QueryRouter subclass")
        if name in _ROUTERS and _ROUTERS[name] is not cls:
            raise ValueError(f"query router {name!r} is already registered")
        _ROUTERS[name] = cls
        cls.name = name
        return cls

    return decorate


def list_routers() -> list[str]:
    """Registered query-router names, sorted."""
    return sorted(_ROUTERS)


def create_router(name: str, **options: Any) -> QueryRouter:
    """Build the query router registered as `name`, e.g. `create_router("knn", k=20, encoder="wordllama")`."""
    if name not in _ROUTERS:
        raise ValueError(f"unknown query router {name!r}; valid names: {', '.join(list_routers())}")
    cls = _ROUTERS[name]
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"query router {name!r} has no option {unknown[0]!r}; options: {', '.join(allowed)}")
    return cls(**options)


def load_router(path: str | Path) -> QueryRouter:
    """Rebuild a router saved with `router.save(path)`; reads JSON and safetensors only."""
    from safetensors.numpy import load_file

    path = Path(path)
    meta_file = path / "router.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: no router.json (not a saved query router folder)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_file}: invalid JSON ({exc.msg})") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: not a {FORMAT} v{FORMAT_VERSION} file")
    router = create_router(meta["router"], **meta["options"])
    arrays = load_file(str(path / "arrays.safetensors"))
    router.model_names = list(meta["model_names"])
    router.cost_M = np.asarray(meta["cost_M"], dtype=np.float64)
    router.strong = int(meta["strong"])
    if router.uses_encoder:
        enc = {k[len("encoder."):]: v for k, v in arrays.items() if k.startswith("encoder.")}
        router.encoder = encoder_from_state(meta["encoder"], enc)
    router._set_arrays({k[len("router."):]: v for k, v in arrays.items() if k.startswith("router.")}, meta["extra"])
    return router

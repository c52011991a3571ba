"""`cascade`: call cheaper models first, escalate while the answer's quality looks too low.

Source: FrugalGPT's LLM cascade (Chen, Zaharia and Zou, 2023) and RouterBench's simulated cascades. Defining
property: a query visits the chain of models in increasing cost order, stopping at the first model whose answer
quality q >= threshold τ (the knob); the last model in the chain answers whatever its quality; the query is charged
for every model it called. The chain defaults to the training cost–quality Pareto front (no model in it is both
dearer and worse on average than another), cheapest first; `chain=[names]` sets it.

Answer quality comes from one of two judges:
- `judge_error=None` (deployable): a kNN estimate of the model's score on this prompt (mean over the k most similar
  training prompts), the quality a learned scorer would assign without seeing the answer;
- `judge_error=ε` (RouterBench's simulation, evaluation only): the judge sees the true score of the answer, but with
  probability ε reports a uniform random number instead; it needs the test outcomes (`observe`), so evaluation flags
  it like the oracle. Judge errors are a fixed function of (prompt, model, seed).
"""

from __future__ import annotations

import numpy as np

from routelab._checks import check_int, check_number
from routelab.query.routers.base import QueryRouter, register_query_router
from routelab.query.routers.knn import knn_mean
from routelab.query.routers.random import prompt_uniforms


@register_query_router("cascade")
class CascadeRouter(QueryRouter):
    def __init__(self, *, chain: list[str] | None = None, judge_error: float | None = None, k: int = 20,
                 encoder: str = "tfidf", seed: int = 0) -> None:
        super().__init__(encoder=encoder, seed=seed)
        if chain is not None and (not isinstance(chain, list) or not chain or not all(isinstance(c, str) for c in chain)):
            raise ValueError(f"chain must be a non-empty list of model names or None, got {chain!r}")
        if judge_error is not None:
            check_number("judge_error", judge_error, low=0.0, high=1.0)
        check_int("k", k, 1)
        self.chain, self.judge_error, self.k = chain, judge_error, k
        self.needs_test_labels = judge_error is not None
        self._truth: dict[str, np.ndarray] = {}

    @property
    def knob_name(self) -> str:
        return "threshold"

    def _fit(self, x_ND, outcomes) -> None:
        names = outcomes.model_names
        if self.chain is not None:
            unknown = [c for c in self.chain if c not in names]
            if unknown:
                raise ValueError(f"chain model {unknown[0]!r} is not in the pool; models: {', '.join(names)}")
            order = [names.index(c) for c in self.chain]
        else:
            mean_M = outcomes.scores_NM.mean(axis=0)
            by_cost = sorted(range(len(names)), key=lambda j: (self.cost_M[j], -mean_M[j], j))
            order, best = [], -np.inf
            for j in by_cost:  # Pareto front, cheapest first: keep a model only if it beats every cheaper one
                if mean_M[j] > best:
                    order.append(j)
                    best = mean_M[j]
        self._order = np.asarray(order, dtype=np.int64)
        self._train_KD, self._scores_KM = x_ND.astype(np.float32), outcomes.scores_NM

    def observe(self, outcomes) -> None:
        """The true scores the simulated judge reads (evaluation only)."""
        cols = [outcomes.model_names.index(m) for m in self.model_names]
        self._truth = {p: outcomes.scores_NM[i, cols] for i, p in enumerate(outcomes.prompts)}

    def _predict(self, x_ND, prompts):
        return knn_mean(x_ND, self._train_KD, self._scores_KM, self.k)

    def judged_quality(self, prompts: list[str], scores_NM: np.ndarray | None = None) -> np.ndarray:
        """The quality [N, M] the cascade's judge assigns to each model's answer."""
        if self.judge_error is None:
            return self.predict(prompts) if scores_NM is None else scores_NM
        try:
            truth = np.stack([self._truth[p] for p in prompts]) if prompts else np.zeros((0, len(self.model_names)))
        except KeyError:
            raise ValueError("a cascade with a simulated judge (judge_error set) needs the true outcomes of its "
                             "prompts: call observe(outcomes); it cannot route unseen prompts") from None
        m = len(self.model_names)
        u = prompt_uniforms(prompts, self.seed + 1, 2 * m)
        wrong = u[:, :m] < self.judge_error
        return np.where(wrong, u[:, m:], truth)

    def calls(self, prompts, *, threshold=None, willingness_to_pay=None, scores_NM=None) -> np.ndarray:
        self._check_fitted()
        if willingness_to_pay is not None:
            raise ValueError("the cascade's knob is threshold (escalate below it), not willingness_to_pay")
        tau = 0.5 if threshold is None else threshold
        check_number("threshold", tau, low=0.0, high=1.0)
        q_NM = self.judged_quality(list(prompts), scores_NM)
        calls_NM = np.zeros(q_NM.shape, dtype=bool)
        open_N = np.ones(len(q_NM), dtype=bool)
        for step, j in enumerate(self._order):
            calls_NM[open_N, j] = True
            if step < len(self._order) - 1:
                open_N &= q_NM[:, j] < tau
        return calls_NM

    def route(self, prompts, *, willingness_to_pay=None, threshold=None, scores_NM=None):
        calls_NM = self.calls(prompts, threshold=threshold, willingness_to_pay=willingness_to_pay,
                              scores_NM=scores_NM)
        # the answer is the last model called: the chain is in order, so the highest chain position with a call
        pos_NC = calls_NM[:, self._order]
        last = len(self._order) - 1 - np.argmax(pos_NC[:, ::-1], axis=1)
        return self._order[last]

    def _arrays(self):
        return {"train": self._train_KD, "scores": self._scores_KM, "order": self._order}

    def _set_arrays(self, arrays, extra) -> None:
        self._train_KD, self._scores_KM, self._order = arrays["train"], arrays["scores"], arrays["order"]

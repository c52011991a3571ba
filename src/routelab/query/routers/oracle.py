"""`oracle`: the best model for each query, read from the true outcomes — an UPPER BOUND, not a router.

Source: the oracle of RouterBench and RouteLLM. Defining property: it looks at the test labels (`observe(outcomes)`),
so no deployable router can beat it; every report flags it. Under willingness to pay λ it maximises the true score −
λ · the true cost of that query; ties go to the cheaper model.
"""

from __future__ import annotations

import numpy as np

from routelab.query.routers.base import QueryRouter, argmax_cheapest, register_query_router


@register_query_router("oracle")
class OracleRouter(QueryRouter):
    uses_encoder = False
    needs_test_labels = True

    def __init__(self) -> None:
        super().__init__()
        self._rows: dict[str, int] = {}
        self._scores_NM = np.zeros((0, 0))
        self._costs_NM = np.zeros((0, 0))

    def _fit(self, x_ND, outcomes) -> None:
        self.observe(outcomes)

    def observe(self, outcomes) -> None:
        """Remember the true outcomes of these prompts (the test set, in evaluation)."""
        order = [outcomes.model_names.index(m) for m in self.model_names]
        self._rows = {p: i for i, p in enumerate(outcomes.prompts)}
        self._scores_NM = outcomes.scores_NM[:, order]
        costs = outcomes.costs_NM
        self._costs_NM = (costs[:, order] if costs is not None
                          else np.repeat(self.cost_M[None, :], len(outcomes.prompts), axis=0))

    def _index(self, prompts) -> np.ndarray:
        try:
            return np.array([self._rows[p] for p in prompts], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"the oracle knows only the prompts it observed; unseen prompt {str(exc)[:60]}") from None

    def _predict(self, x_ND, prompts):
        return self._scores_NM[self._index(prompts)]

    def route(self, prompts, *, willingness_to_pay=None, threshold=None, scores_NM=None):
        if threshold is not None or willingness_to_pay is None:
            return super().route(prompts, willingness_to_pay=willingness_to_pay, threshold=threshold)
        super().route(prompts, willingness_to_pay=willingness_to_pay)  # validates the knob
        idx = self._index(prompts)
        return argmax_cheapest(self._scores_NM[idx] - willingness_to_pay * self._costs_NM[idx], self.cost_M)

    def _arrays(self):
        return {"scores": self._scores_NM, "costs": self._costs_NM}

    def _extra(self) -> dict:
        return {"prompts": sorted(self._rows, key=self._rows.get)}

    def _set_arrays(self, arrays, extra) -> None:
        self._scores_NM, self._costs_NM = arrays["scores"], arrays["costs"]
        self._rows = {p: i for i, p in enumerate(extra["prompts"])}

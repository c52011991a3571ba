"""`single`: always the same model — the pool's members as routers, the points every router is compared with.

Source: the single-model baselines of RouterBench and RouteLLM. Defining property: one model for every query,
whatever the knob. `model=None` picks the model with the best mean training score.
"""

from __future__ import annotations

import numpy as np

from routelab.query.routers.base import QueryRouter, register_query_router


@register_query_router("single")
class SingleRouter(QueryRouter):
    uses_encoder = False

    def __init__(self, *, model: str | None = None) -> None:
        super().__init__()
        if model is not None and not isinstance(model, str):
            raise ValueError(f"model must be a model name (str) or None, got {model!r}")
        self.model = model
        self.index = 0

    def _fit(self, x_ND, outcomes) -> None:
        if self.model is None:
            self.index = outcomes.strongest_model()
        elif self.model not in outcomes.model_names:
            raise ValueError(f"model {self.model!r} is not in the pool; models: {', '.join(outcomes.model_names)}")
        else:
            self.index = outcomes.model_names.index(self.model)

    def _set_arrays(self, arrays, extra) -> None:
        self.index = int(extra["index"])

    def _extra(self) -> dict:
        return {"index": self.index}

    def _predict(self, x_ND, prompts):
        scores_NM = np.zeros((len(prompts), len(self.model_names)))
        scores_NM[:, self.index] = 1.0
        return scores_NM

    def route(self, prompts, *, willingness_to_pay=None, threshold=None, scores_NM=None):
        self._check_fitted()
        super().route(prompts, willingness_to_pay=willingness_to_pay, threshold=threshold, scores_NM=scores_NM)
        return np.full(len(prompts), self.index, dtype=np.int64)

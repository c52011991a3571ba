"""`knn`: the mean outcome of the k training prompts most similar to the query.

Source: RouterBench's and LLMRouter's KNN routers. Defining property: the predicted score of model m for a query is
the mean of m's scores over its k nearest training prompts (cosine similarity of the prompt embeddings).
"""

from __future__ import annotations

import numpy as np

from routelab._checks import check_int
from routelab.query.routers.base import QueryRouter, register_query_router

_CHUNK = 2048  # queries per similarity block: bounds memory at CHUNK x training prompts


def knn_mean(x_ND: np.ndarray, train_KD: np.ndarray, values_KM: np.ndarray, k: int) -> np.ndarray:
    """Mean of `values_KM` over each row's k most cosine-similar training rows (inputs L2-normalised)."""
    k = min(k, len(train_KD))
    out = np.empty((len(x_ND), values_KM.shape[1]))
    for start in range(0, len(x_ND), _CHUNK):
        sim = x_ND[start:start + _CHUNK] @ train_KD.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        out[start:start + _CHUNK] = values_KM[top].mean(axis=1)
    return out


@register_query_router("knn")
class KnnRouter(QueryRouter):
    def __init__(self, *, k: int = 20, encoder: str = "tfidf", seed: int = 0) -> None:
        super().__init__(encoder=encoder, seed=seed)
        check_int("k", k, 1)
        self.k = k

    def _fit(self, x_ND, outcomes) -> None:
        self._train_KD, self._scores_KM = x_ND.astype(np.float32), outcomes.scores_NM

    def _predict(self, x_ND, prompts):
        return knn_mean(x_ND, self._train_KD, self._scores_KM, self.k)

    def _arrays(self):
        return {"train": self._train_KD, "scores": self._scores_KM}

    def _set_arrays(self, arrays, extra) -> None:
        self._train_KD, self._scores_KM = arrays["train"], arrays["scores"]

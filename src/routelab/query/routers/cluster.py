"""`cluster`: k-means over prompt embeddings, each cluster's best model under the cost knob.

Source: the cluster-then-route shape of "Composition of Experts" (SambaNova, 2024) and Tryage (Hari and Thomson,
2023), also LLMRouter's cluster routers. Defining property: the predicted score of model m for a query is m's mean
training score in the query's k-means cluster (nearest centroid), shrunk towards m's global mean by `shrinkage`
pseudo-prompts so that tiny clusters do not decide alone. Centroids come from scikit-learn's KMeans and are stored as
an array.
"""

from __future__ import annotations

import numpy as np

from routelab._checks import check_int, check_number
from routelab.query.routers.base import QueryRouter, register_query_router


@register_query_router("cluster")
class ClusterRouter(QueryRouter):
    def __init__(self, *, clusters: int = 16, shrinkage: float = 5.0, encoder: str = "tfidf", seed: int = 0) -> None:
        super().__init__(encoder=encoder, seed=seed)
        check_int("clusters", clusters, 1)
        check_number("shrinkage", shrinkage, low=0.0)
        self.clusters, self.shrinkage = clusters, shrinkage

    def _fit(self, x_ND, outcomes) -> None:
        from sklearn.cluster import KMeans

        k = min(self.clusters, len(x_ND))
        km = KMeans(n_clusters=k, n_init=3, random_state=self.seed).fit(x_ND.astype(np.float64))
        self._centroids_CD = km.cluster_centers_.astype(np.float32)
        label_N = self._assign(x_ND)  # our own assignment rule, the one predict uses
        s = outcomes.scores_NM
        global_M = s.mean(axis=0)
        sums_CM = np.zeros((k, s.shape[1]))
        np.add.at(sums_CM, label_N, s)
        count_C = np.bincount(label_N, minlength=k)[:, None]
        self._table_CM = (sums_CM + self.shrinkage * global_M) / (count_C + self.shrinkage)

    def _assign(self, x_ND: np.ndarray) -> np.ndarray:
        d2 = (x_ND**2).sum(1)[:, None] - 2 * x_ND @ self._centroids_CD.T + (self._centroids_CD**2).sum(1)[None, :]
        return d2.argmin(axis=1)

    def _predict(self, x_ND, prompts):
        return self._table_CM[self._assign(x_ND)]

    def _arrays(self):
        return {"centroids": self._centroids_CD, "table": self._table_CM}

    def _set_arrays(self, arrays, extra) -> None:
        self._centroids_CD, self._table_CM = arrays["centroids"], arrays["table"]

"""`sw_ranking`: RouteLLM's similarity-weighted Bradley–Terry ranking.

Source: Ong et al., "RouteLLM" (2024), the `sw_ranking` router. Defining property: for each query, a Bradley–Terry
model is fitted to the training battles, each battle weighted by how similar its prompt is to the query, and the
query goes by the fitted win probabilities. Reconstructed for per-query scores: every pair of models on a training
prompt is one battle (the higher score wins; equal scores are a tie, half a win each). Weights follow RouteLLM's
shape, gamma^(1 + sim / max_sim) over the cosine similarities to the query. Bradley–Terry strengths are fitted by
Hunter's MM algorithm on weights rescaled to Kish's effective sample size, with a small symmetric prior (`prior` tied battles per pair, so no strength is 0 or
infinite). Predicted scores are each model's mean win probability against the others; with two models the strong
model's is its Bradley–Terry win probability.
"""

from __future__ import annotations

import numpy as np

from routelab._checks import check_number
from routelab.query.routers.base import QueryRouter, register_query_router

_CHUNK = 1024


def battle_matrix(scores_NM: np.ndarray) -> np.ndarray:
    """W[n, a, b] = 1 if a beat b on prompt n, 0.5 for a tie, 0 otherwise (diagonal 0), flattened [N, M*M]."""
    s = scores_NM
    w = (s[:, :, None] > s[:, None, :]) + 0.5 * (s[:, :, None] == s[:, None, :])
    m = s.shape[1]
    w[:, np.arange(m), np.arange(m)] = 0.0
    return w.reshape(len(s), m * m).astype(np.float64)


def bradley_terry_win_rates(wins_NMM: np.ndarray, prior: float, iters: int = 100) -> np.ndarray:
    """Mean BT win probability of each model against the others, [N, M], from weighted win matrices [N, M, M]."""
    n, m, _ = wins_NMM.shape
    if m == 1:
        return np.full((n, 1), 0.5)
    wins = wins_NMM + prior * 0.5 * (1 - np.eye(m))[None]
    games = wins + wins.transpose(0, 2, 1)
    total_wins = wins.sum(axis=2)  # [N, M]
    p = np.ones((n, m))
    for _ in range(iters):
        denom = (games / (p[:, :, None] + p[:, None, :])).sum(axis=2)
        p = total_wins / denom
        p /= p.sum(axis=1, keepdims=True)
    prob = p[:, :, None] / (p[:, :, None] + p[:, None, :])
    return (prob.sum(axis=2) - 0.5) / (m - 1)


@register_query_router("sw_ranking")
class SwRankingRouter(QueryRouter):
    def __init__(self, *, gamma: float = 10.0, prior: float = 1.0, encoder: str = "tfidf", seed: int = 0) -> None:
        super().__init__(encoder=encoder, seed=seed)
        check_number("gamma", gamma, low=1.0)
        check_number("prior", prior, low=0.0, open_low=True)
        self.gamma, self.prior = gamma, prior

    def _fit(self, x_ND, outcomes) -> None:
        self._train_KD = x_ND.astype(np.float32)
        self._battles_KW = battle_matrix(outcomes.scores_NM)

    def _predict(self, x_ND, prompts):
        m = len(self.model_names)
        out = np.empty((len(x_ND), m))
        for start in range(0, len(x_ND), _CHUNK):
            sim = (x_ND[start:start + _CHUNK] @ self._train_KD.T).astype(np.float64)
            max_sim = np.maximum(sim.max(axis=1, keepdims=True), 1e-6)
            weight = self.gamma ** (1.0 + sim / max_sim)
            # Kish's effective sample size: the weighted battles are worth n_eff battles per pair against the prior
            n_eff = weight.sum(axis=1, keepdims=True) ** 2 / (weight**2).sum(axis=1, keepdims=True)
            weight *= n_eff / weight.sum(axis=1, keepdims=True)
            wins = (weight @ self._battles_KW).reshape(-1, m, m)
            out[start:start + _CHUNK] = bradley_terry_win_rates(wins, self.prior)
        return out

    def _arrays(self):
        return {"train": self._train_KD, "battles": self._battles_KW}

    def _set_arrays(self, arrays, extra) -> None:
        self._train_KD, self._battles_KW = arrays["train"], arrays["battles"]

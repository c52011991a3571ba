"""`linucb`: an online contextual bandit that learns from the reward of the model it chose, one query at a time.

Source: LinUCB with disjoint linear models (Li, Chu, Langford and Schapire, "A contextual-bandit approach to
personalized news article recommendation", 2010), the online routing setting of GreenServ and POLAR. Defining
property: per model m a ridge regression θ_m of score on the prompt embedding (plus a bias), updated only with the
score of the model actually chosen; it chooses argmax_m θ_m·x + alpha·sqrt(xᵀA_m⁻¹x) − λ·cost_m. `fit` replays the
training outcomes once as a stream (in a seeded shuffled order) — the router never sees the scores of models it did
not choose. After fitting, `predict` is the exploitation estimate θ_m·x and `route` the usual cost knob; `replay`
runs the online protocol on a stream and returns the cumulative regret against the oracle.
"""

from __future__ import annotations

import numpy as np

from routelab._checks import check_number
from routelab.query.routers.base import QueryRouter, argmax_cheapest, register_query_router


@register_query_router("linucb")
class LinUcbRouter(QueryRouter):
    def __init__(self, *, alpha: float = 0.5, ridge: float = 1.0, train_willingness_to_pay: float = 0.0,
                 encoder: str = "tfidf", seed: int = 0) -> None:
        super().__init__(encoder=encoder, seed=seed)
        check_number("alpha", alpha, low=0.0)
        check_number("ridge", ridge, low=0.0, open_low=True)
        check_number("train_willingness_to_pay", train_willingness_to_pay, low=0.0)
        self.alpha, self.ridge, self.train_willingness_to_pay = alpha, ridge, train_willingness_to_pay

    def _features(self, x_ND: np.ndarray) -> np.ndarray:
        return np.concatenate([x_ND.astype(np.float64), np.ones((len(x_ND), 1))], axis=1)

    def _fit(self, x_ND, outcomes) -> None:
        m, d = outcomes.num_models, x_ND.shape[1] + 1
        self._a_inv_MDD = np.repeat(np.eye(d)[None] / self.ridge, m, axis=0)
        self._b_MD = np.zeros((m, d))
        order = np.random.default_rng(self.seed).permutation(outcomes.num_prompts)
        costs = outcomes.costs_NM if outcomes.costs_NM is not None else np.repeat(self.cost_M[None], len(x_ND), 0)
        self._stream(x_ND[order], outcomes.scores_NM[order], costs[order], self.train_willingness_to_pay)

    def _stream(self, x_ND, scores_NM, costs_NM, lam) -> tuple[np.ndarray, np.ndarray]:
        """The online protocol: choose, observe the chosen model's score only, update. Returns (choices, rewards)."""
        z_ND = self._features(x_ND)
        choices, rewards = np.empty(len(z_ND), dtype=np.int64), np.empty(len(z_ND))
        theta_MD = np.einsum("mij,mj->mi", self._a_inv_MDD, self._b_MD)
        for t, z in enumerate(z_ND):
            az_MD = self._a_inv_MDD @ z
            ucb_M = theta_MD @ z + self.alpha * np.sqrt(np.maximum(az_MD @ z, 0.0)) - lam * self.cost_M
            j = int(argmax_cheapest(ucb_M[None], self.cost_M)[0])
            r = scores_NM[t, j]
            az = az_MD[j]
            self._a_inv_MDD[j] -= np.outer(az, az) / (1.0 + z @ az)  # Sherman–Morrison rank-one update of A⁻¹
            self._b_MD[j] += r * z
            theta_MD[j] = self._a_inv_MDD[j] @ self._b_MD[j]  # only the chosen arm's estimate changed
            choices[t], rewards[t] = j, r - lam * costs_NM[t, j]
        return choices, rewards

    def replay(self, x_ND: np.ndarray, scores_NM: np.ndarray, costs_NM: np.ndarray, *,
               willingness_to_pay: float = 0.0) -> dict:
        """Continue learning online over a stream; returns choices, rewards and cumulative regret [N] against the
        oracle's per-query best reward (score − λ·cost). The router's state advances with the stream."""
        check_number("willingness_to_pay", willingness_to_pay, low=0.0)
        choices, rewards = self._stream(x_ND, scores_NM, costs_NM, willingness_to_pay)
        best = (scores_NM - willingness_to_pay * costs_NM).max(axis=1)
        return {"choices": choices, "rewards": rewards, "cumulative_regret": np.cumsum(best - rewards)}

    def _predict(self, x_ND, prompts):
        theta_MD = np.einsum("mij,mj->mi", self._a_inv_MDD, self._b_MD)
        return self._features(x_ND) @ theta_MD.T

    def _arrays(self):
        return {"a_inv": self._a_inv_MDD, "b": self._b_MD}

    def _set_arrays(self, arrays, extra) -> None:
        self._a_inv_MDD, self._b_MD = arrays["a_inv"].copy(), arrays["b"].copy()

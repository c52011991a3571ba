"""`mf`: RouteLLM's matrix-factorisation router.

Source: Ong et al., "RouteLLM: Learning to Route LLMs with Preference Data" (2024), the `mf` router. Defining
property: a bilinear utility u(q, m) = w · (v_m ⊙ P e_q), with a learned vector v_m per model, a learned projection P
of the prompt embedding e_q and a learned output vector w, trained on pairwise preferences so that
sigmoid(u(q, a) − u(q, b)) is the probability that model a's answer beats model b's. Reconstructed for per-query
scores: every pair of models whose scores on a training prompt differ is one preference (ties are not used, as in
RouteLLM's training); predicted scores are each model's mean predicted win rate against the others, so with two
models the strong model's predicted score is exactly RouteLLM's win rate and the threshold knob means what it means
there.
"""

from __future__ import annotations

import numpy as np

from routelab._checks import check_int, check_number
from routelab.query.routers.base import QueryRouter, register_query_router


def pairwise_win_rates(u_NM: np.ndarray) -> np.ndarray:
    """Mean over the other models j of sigmoid(u_m − u_j), [N, M]; 0.5 for a single model."""
    m = u_NM.shape[1]
    if m == 1:
        return np.full_like(u_NM, 0.5)
    p = 1.0 / (1.0 + np.exp(-(u_NM[:, :, None] - u_NM[:, None, :])))
    return (p.sum(axis=2) - 0.5) / (m - 1)


def preference_pairs(scores_NM: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt, winner, loser) index arrays for every pair of models with different scores on a prompt."""
    n, m = scores_NM.shape
    i, a, b = np.meshgrid(np.arange(n), np.arange(m), np.arange(m), indexing="ij")
    better = scores_NM[:, :, None] > scores_NM[:, None, :]
    return i[better], a[better], b[better]


@register_query_router("mf")
class MfRouter(QueryRouter):
    def __init__(self, *, dim: int = 64, epochs: int = 200, lr: float = 1e-2, weight_decay: float = 1e-4,
                 encoder: str = "tfidf", seed: int = 0) -> None:
        super().__init__(encoder=encoder, seed=seed)
        check_int("dim", dim, 1)
        check_int("epochs", epochs, 1)
        check_number("lr", lr, low=0.0, open_low=True)
        check_number("weight_decay", weight_decay, low=0.0)
        self.dim, self.epochs, self.lr, self.weight_decay = dim, epochs, lr, weight_decay

    def _fit(self, x_ND, outcomes) -> None:
        import torch

        gen = torch.Generator().manual_seed(self.seed)
        x = torch.as_tensor(x_ND, dtype=torch.float32)
        d, m = x.shape[1], outcomes.num_models
        v = (torch.randn(m, self.dim, generator=gen) / self.dim**0.5).requires_grad_()
        proj = (torch.randn(d, self.dim, generator=gen) / d**0.5).requires_grad_()
        w = (torch.randn(self.dim, generator=gen) / self.dim**0.5).requires_grad_()
        q, win, lose = (torch.as_tensor(a) for a in preference_pairs(outcomes.scores_NM))
        opt = torch.optim.Adam([v, proj, w], lr=self.lr, weight_decay=self.weight_decay)
        for _ in range(self.epochs if len(q) else 0):
            h = (x @ proj)[q]  # project each prompt once, then gather per preference: [P, dim]
            margin = ((v[win] - v[lose]) * h) @ w  # u(q, winner) − u(q, loser)
            loss = torch.nn.functional.softplus(-margin).mean()  # −log sigmoid(margin)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self._v, self._proj, self._w = (t.detach().numpy().astype(np.float32) for t in (v, proj, w))

    def utilities(self, x_ND: np.ndarray) -> np.ndarray:
        """u(q, m) for every prompt and model, [N, M]."""
        return ((x_ND @ self._proj)[:, None, :] * self._v[None, :, :]) @ self._w

    def _predict(self, x_ND, prompts):
        return pairwise_win_rates(self.utilities(x_ND).astype(np.float64))

    def _arrays(self):
        return {"v": self._v, "proj": self._proj, "w": self._w}

    def _set_arrays(self, arrays, extra) -> None:
        self._v, self._proj, self._w = arrays["v"], arrays["proj"], arrays["w"]

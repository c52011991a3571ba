"""`mlp`: a small neural network on the prompt embedding, one sigmoid output per model.

Source: RouterBench's and LLMRouter's MLP routers. Defining property: predicted score of model m = sigmoid of the
m-th output of a one-hidden-layer ReLU network on the embedding, trained with binary cross-entropy on the observed
scores (soft targets in [0, 1]); full-batch Adam with weight decay, a fixed seed. Inference runs in NumPy.
"""

from __future__ import annotations

import numpy as np

from routelab._checks import check_int, check_number
from routelab.query.routers.base import QueryRouter, register_query_router


@register_query_router("mlp")
class MlpRouter(QueryRouter):
    def __init__(self, *, hidden: int = 128, epochs: int = 300, lr: float = 3e-3, weight_decay: float = 1e-3,
                 encoder: str = "tfidf", seed: int = 0) -> None:
        super().__init__(encoder=encoder, seed=seed)
        check_int("hidden", hidden, 1)
        check_int("epochs", epochs, 1)
        check_number("lr", lr, low=0.0, open_low=True)
        check_number("weight_decay", weight_decay, low=0.0)
        self.hidden, self.epochs, self.lr, self.weight_decay = hidden, epochs, lr, weight_decay

    def _fit(self, x_ND, outcomes) -> None:
        import torch

        gen = torch.Generator().manual_seed(self.seed)
        x = torch.as_tensor(x_ND, dtype=torch.float32)
        y = torch.as_tensor(np.clip(outcomes.scores_NM, 0.0, 1.0), dtype=torch.float32)
        d, m = x.shape[1], y.shape[1]
        w1 = (torch.randn(d, self.hidden, generator=gen) / d**0.5).requires_grad_()
        b1 = torch.zeros(self.hidden, requires_grad=True)
        w2 = (torch.randn(self.hidden, m, generator=gen) / self.hidden**0.5).requires_grad_()
        b2 = torch.logit(y.mean(0).clamp(0.02, 0.98)).detach().requires_grad_()  # start at the base rates
        params = [w1, b1, w2, b2]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        for _ in range(self.epochs):
            logits = torch.relu(x @ w1 + b1) @ w2 + b2
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self._w = {name: p.detach().numpy().astype(np.float32) for name, p in zip(("w1", "b1", "w2", "b2"), params)}

    def _predict(self, x_ND, prompts):
        w = self._w
        logits = np.maximum(x_ND @ w["w1"] + w["b1"], 0.0) @ w["w2"] + w["b2"]
        return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))

    def _arrays(self):
        return dict(self._w)

    def _set_arrays(self, arrays, extra) -> None:
        self._w = dict(arrays)

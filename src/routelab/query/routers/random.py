"""`random`: a uniformly random model per query — the baseline every router must beat.

Source: RouteLLM's `random` router and RouterBench's random baseline. Defining property: its decisions carry no
information about the query, so on two models its quality rises linearly with the share of calls to the strong model
(APGR = 0.5 in expectation). Predicted scores are uniform draws fixed per prompt text (a hash of the prompt and the
seed), so a saved router gives identical decisions after loading.
"""

from __future__ import annotations

import hashlib

import numpy as np

from routelab.query.routers.base import QueryRouter, register_query_router


def prompt_uniforms(prompts: list[str], seed: int, m: int) -> np.ndarray:
    """Uniform [N, m] numbers in [0, 1), a deterministic function of (prompt text, seed)."""
    out = np.empty((len(prompts), m))
    for i, p in enumerate(prompts):
        digest = hashlib.blake2b(p.encode("utf-8", "surrogatepass"), digest_size=8, key=str(seed).encode()).digest()
        out[i] = np.random.default_rng(int.from_bytes(digest, "little")).random(m)
    return out


@register_query_router("random")
class RandomRouter(QueryRouter):
    uses_encoder = False

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__(seed=seed)

    def _fit(self, x_ND, outcomes) -> None:
        pass  # nothing to learn: the router's defining property

    def _predict(self, x_ND, prompts):
        return prompt_uniforms(prompts, self.seed, len(self.model_names))

"""Synthetic outcome tables for the query-router tests: the best model depends on a learnable feature of the prompt
(its topic words), so any router that learns from prompts beats a random choice."""

from __future__ import annotations

import numpy as np
import pytest

from routelab.query import Outcomes

TOPIC_A = "integral derivative equation algebra matrix polynomial theorem proof".split()
TOPIC_B = "poem sonnet verse rhyme stanza metaphor ballad haiku".split()
FILLER = "the a of please write about some and with for this that kindly".split()


def synthetic_prompts(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    topic_N = rng.integers(0, 2, n)
    prompts = []
    for i, t in enumerate(topic_N):
        words = list(rng.choice(TOPIC_A if t == 0 else TOPIC_B, 3)) + list(rng.choice(FILLER, 5))
        rng.shuffle(words)
        prompts.append(f"{' '.join(words)} #{seed}-{i}")
    return prompts, topic_N


def three_model_table(n: int = 300, seed: int = 0) -> Outcomes:
    """small ($1e-4): topic A 0.9 / B 0.1; medium ($3e-4): A 0.1 / B 0.9; large ($1e-3): 0.6 everywhere."""
    prompts, topic_N = synthetic_prompts(n, seed)
    rng = np.random.default_rng(seed + 100)
    p_NM = np.where(topic_N[:, None] == 0, [[0.9, 0.1, 0.6]], [[0.1, 0.9, 0.6]])
    scores = (rng.random(p_NM.shape) < p_NM).astype(float)
    costs = np.repeat([[1e-4, 3e-4, 1e-3]], n, axis=0)
    cats = ["math" if t == 0 else "poetry" for t in topic_N]
    return Outcomes(prompts, ["small", "medium", "large"], scores, costs, cats, ["synthetic"] * n)


def two_model_table(n: int = 300, seed: int = 0) -> Outcomes:
    """weak: topic A 0.85 / B 0.15; strong: 0.9 everywhere; no costs (RouteLLM's setting)."""
    prompts, topic_N = synthetic_prompts(n, seed)
    rng = np.random.default_rng(seed + 200)
    p_NM = np.where(topic_N[:, None] == 0, [[0.85, 0.9]], [[0.15, 0.9]])
    scores = (rng.random(p_NM.shape) < p_NM).astype(float)
    cats = ["math" if t == 0 else "poetry" for t in topic_N]
    return Outcomes(prompts, ["weak", "strong"], scores, None, cats, ["synthetic"] * n)


@pytest.fixture(scope="module", autouse=False)
def one_blas_thread():
    """One BLAS/OpenMP thread: on a shared CPU, spinning BLAS threads make small SVDs and k-means 30x slower."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield

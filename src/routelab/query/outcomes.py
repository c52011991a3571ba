"""Per-query outcome data: how well each model of a pool answered each prompt, and what it cost.

Shapes: N prompts, M models. `Outcomes.scores_NM` is higher-is-better in [0, 1] (0/1 correctness, or a judge score
normalised to [0, 1]); `Outcomes.costs_NM` is dollars per query, or None when neither the file nor a price table
gives costs. Loaders for the formats users have live in `routelab.query.loaders`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class OutcomeDataError(ValueError):
    """Malformed or unusable outcome data; the message names the file and, where known, the line."""


@dataclass(frozen=True)
class Outcomes:
    """Outcomes of M models on N prompts.

    `costs_estimated` is True when costs come from a price table and estimated token counts rather than from the
    data (every report says so). `notes` records what a loader decided (rows excluded as contaminated, cost
    estimates), for reports.
    """

    prompts: list[str]
    model_names: list[str]
    scores_NM: np.ndarray
    costs_NM: np.ndarray | None = None
    categories: list[str] | None = None
    sources: list[str] | None = None
    costs_estimated: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        n, m = len(self.prompts), len(self.model_names)
        scores = np.asarray(self.scores_NM, dtype=np.float64)
        object.__setattr__(self, "scores_NM", scores)
        if scores.shape != (n, m):
            raise OutcomeDataError(f"scores_NM must have shape [{n}, {m}] (prompts, models), got {scores.shape}")
        if not np.isfinite(scores).all():
            raise OutcomeDataError("scores_NM must be finite")
        if len(set(self.model_names)) != m:
            raise OutcomeDataError(f"model names must be distinct, got {self.model_names}")
        if self.costs_NM is not None:
            costs = np.asarray(self.costs_NM, dtype=np.float64)
            object.__setattr__(self, "costs_NM", costs)
            if costs.shape != (n, m) or not np.isfinite(costs).all() or (costs < 0).any():
                raise OutcomeDataError(f"costs_NM must be finite, >= 0 and of shape [{n}, {m}]")
        for name in ("categories", "sources"):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, [""] * n)
            elif len(value) != n:
                raise OutcomeDataError(f"{name} must have one entry per prompt ({n}), got {len(value)}")

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    @property
    def num_models(self) -> int:
        return len(self.model_names)

    def subset(self, index: np.ndarray | list[int]) -> Outcomes:
        """The outcomes of the prompts at `index` (in that order)."""
        idx = np.asarray(index, dtype=np.int64)
        return Outcomes(
            prompts=[self.prompts[i] for i in idx],
            model_names=list(self.model_names),
            scores_NM=self.scores_NM[idx],
            costs_NM=None if self.costs_NM is None else self.costs_NM[idx],
            categories=[self.categories[i] for i in idx],
            sources=[self.sources[i] for i in idx],
            costs_estimated=self.costs_estimated,
            notes=self.notes,
        )

    def strongest_model(self) -> int:
        """Index of the model with the highest mean score (ties: the lower index)."""
        return int(np.argmax(self.scores_NM.mean(axis=0)))


def concat_outcomes(parts: list[Outcomes]) -> Outcomes:
    """Outcomes of several files over the same model pool, in order; the model order of the first part wins."""
    if not parts:
        raise OutcomeDataError("no outcome files given")
    first = parts[0]
    if len(parts) == 1:
        return first
    names = first.model_names
    scores, costs = [], []
    for part in parts:
        if sorted(part.model_names) != sorted(names):
            raise OutcomeDataError(
                f"outcome files cover different models: {sorted(names)} vs {sorted(part.model_names)}"
            )
        order = [part.model_names.index(name) for name in names]
        scores.append(part.scores_NM[:, order])
        costs.append(None if part.costs_NM is None else part.costs_NM[:, order])
    has_costs = all(c is not None for c in costs)
    notes: list[str] = []
    for part in parts:
        notes.extend(n for n in part.notes if n not in notes)
    return Outcomes(
        prompts=[p for part in parts for p in part.prompts],
        model_names=list(names),
        scores_NM=np.concatenate(scores),
        costs_NM=np.concatenate(costs) if has_costs else None,
        categories=[c for part in parts for c in part.categories],
        sources=[s for part in parts for s in part.sources],
        costs_estimated=any(p.costs_estimated for p in parts),
        notes=tuple(notes),
    )

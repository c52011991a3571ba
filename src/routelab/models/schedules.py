"""DynaMoE per-layer k schedules: how many experts each MoE layer may use, as a function of depth.

Paper: DynaMoE (dynamic expert allocation over depth). The five named shapes (uniform, descending, ascending,
pyramid, wave) are the paper's; their exact formulas here are ours (reconstructed; verify): a profile r_l in [0, 1]
over the MoE layers l = 0..L-1 is mapped to k_l = 1 + r_l · (k_max - 1).

    uniform     r_l = 1                               every layer k_max
    descending  r_l = 1 - l/(L-1)                     k_max at the bottom, 1 at the top
    ascending   r_l = l/(L-1)                         1 at the bottom, k_max at the top
    pyramid     r_l = 1 - |2l/(L-1) - 1|              1 at both ends, k_max in the middle
    wave        r_l = (1 + cos(2π l/(L-1)))/2          one period: k_max at both ends, 1 in the middle

Budget matching (`match_budget=True`, the default): the profile is shrunk toward its mean (never stretched) so that
every k_l stays in [1, k_max] and the layer mean equals the uniform budget k, then rounded to integers by largest
remainder (ties: the lower layer first), so the sum is exactly k·L. Defining properties: integers in [1, k_max];
with budget matching, mean == k exactly.
"""

from __future__ import annotations

import math

SHAPES = ("uniform", "descending", "ascending", "pyramid", "wave")


def k_schedule(
    shape: str, num_layers: int, *, k_max: int, k: int | None = None, match_budget: bool = True
) -> list[int]:
    """Per-layer k for `num_layers` MoE layers; `k` is the uniform budget matched when `match_budget`."""
    if shape not in SHAPES:
        raise ValueError(f"k_schedule shape must be one of {', '.join(map(repr, SHAPES))}; got {shape!r}")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    if not isinstance(k_max, int) or isinstance(k_max, bool) or k_max < 1:
        raise ValueError(f"k_schedule k_max must be a positive integer, got {k_max!r}")
    profile = [_profile(shape, l, num_layers) for l in range(num_layers)]
    target = [1.0 + r * (k_max - 1) for r in profile]
    if not match_budget:
        return [int(round(t)) for t in target]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= k_max:
        raise ValueError(f"k_schedule budget k must be an integer in [1, k_max={k_max}], got {k!r}")
    mean = sum(target) / num_layers
    dev = [t - mean for t in target]
    scale = 1.0
    if max(dev) > 1e-12:
        scale = min(scale, (k_max - k) / max(dev))
    if min(dev) < -1e-12:
        scale = min(scale, (k - 1) / -min(dev))
    real = [k + scale * d for d in dev]
    floors = [min(k_max, max(1, math.floor(x + 1e-9))) for x in real]
    remaining = k * num_layers - sum(floors)
    # Largest remainder: give the missing units to the layers whose real value lost the most in flooring.
    order = sorted(range(num_layers), key=lambda l: (-(real[l] - floors[l]), l))
    for l in order:
        if remaining <= 0:
            break
        if floors[l] < k_max:
            floors[l] += 1
            remaining -= 1
    return floors


def _profile(shape: str, l: int, n: int) -> float:
    if n == 1 or shape == "uniform":
        return 1.0
    x = l / (n - 1)
    if shape == "descending":
        return 1.0 - x
    if shape == "ascending":
        return x
    if shape == "pyramid":
        return 1.0 - abs(2.0 * x - 1.0)
    return (1.0 + math.cos(2.0 * math.pi * x)) / 2.0  # wave

"""Option validation shared by every component: each check raises a ValueError naming the option and what is
allowed, before any work is done."""

from __future__ import annotations

import math


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming the option and its allowed values unless `value` is one of them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {short_repr(value)}")


INT64_MAX = 2**63 - 1  # every integer option ends up in a tensor, a seed or a file: int64 bounds them all


def check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """Raise a ValueError naming `name` unless `value` is an int in [low, high] (high defaults to INT64_MAX)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {allowed}, got {short_repr(value)}")
    if high is None and value > INT64_MAX:
        raise ValueError(f"{name} must be an integer <= {INT64_MAX} (the int64 range), got {short_repr(value)}")


def short_repr(value: object, limit: int = 80) -> str:
    """repr(value) cut to about `limit` characters, for error messages (a value may be a megabyte of YAML)."""
    text = repr(value) if not isinstance(value, (list, dict)) or _small(value) else f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"


def _small(value: object, budget: int = 200) -> bool:
    """Whether a nested list/dict has at most `budget` items in all (its repr is cheap)."""
    stack, seen = [value], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > budget:
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def check_bool(name: str, value: object) -> None:
    """Raise a ValueError naming `name` unless `value` is True or False (not 0 or 1)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be one of True, False; got {short_repr(value)}")


def check_number(
    name: str, value: object, *, low: float | None = None, high: float | None = None, open_low: bool = False
) -> None:
    """Raise a ValueError naming `name` unless `value` is a finite real number in the given range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lo = "" if low is None else (f"> {low}" if open_low else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        rng = " and ".join(s for s in (lo, hi) if s) or "finite"
        raise ValueError(f"{name} must be a number {rng}, got {short_repr(value)}")

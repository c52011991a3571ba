"""Option validation shared by every component: each check raises a ValueError naming the option and what is
allowed, before any work is done."""

from __future__ import annotations

import math


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming the option and its allowed values unless `value` is one of them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """Raise a ValueError naming `name` unless `value` is an int in [low, high]."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")


def check_bool(name: str, value: object) -> None:
    """Raise a ValueError naming `name` unless `value` is True or False (not 0 or 1)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be one of True, False; got {value!r}")


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
        raise ValueError(f"{name} must be a number {rng}, got {value!r}")

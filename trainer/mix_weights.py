"""Weights of a mix as typed (torch-free): the command line's ``--grid``/``--lora FILE:W`` and the Mix tab's
grid boxes read them by one rule, so a value one refuses the other does not take."""

from __future__ import annotations

import math
import re

from trainer.errors import UserError

# the Mix tab's sliders; far past it a style LoRA's picture turns to noise (the command line only warns)
WEIGHT_RANGE = (-1.0, 2.0)


def parse_weight(text: str, what: str) -> float:
    """One finite number; a UserError naming ``what`` otherwise."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UserError(f"{what}: {text!r} is not a number (write it like 0.7)") from None
    if not math.isfinite(value):
        raise UserError(f"{what}: {text!r} is not a finite number")
    return value


def parse_weights(text: str, what: str = "weights") -> list[float]:
    """``"0, 0.5, 1"`` (commas, spaces or semicolons) -> ``[0.0, 0.5, 1.0]``.

    Raises:
        UserError: an empty list or a value that is not a finite number (named).
    """
    parts = [p for p in re.split(r"[,\s;]+", str(text or "").strip()) if p]
    if not parts:
        raise UserError(f"{what}: give at least one weight, e.g. 0, 0.5, 1")
    return [parse_weight(part, what) for part in parts]


def outside_range(weights: list[float]) -> list[float]:
    """The weights outside :data:`WEIGHT_RANGE`."""
    low, high = WEIGHT_RANGE
    return [w for w in weights if not low <= w <= high]

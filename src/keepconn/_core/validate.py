"""Validators shared by every configuration object, so errors read the same everywhere.

Each raises :class:`ConfigError` naming the field, the value and the allowed range.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError

__all__ = ["check_number", "describe_number", "number"]


def check_number(
    field: str,
    value: Any,
    *,
    minimum: float = 0.0,
    maximum: float = math.inf,
    min_inclusive: bool = False,
    integer: bool = False,
) -> None:
    """Raise ConfigError unless ``value`` is a finite real number in the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{field} must be a number, got {value!r}")
    if integer and not isinstance(value, int):
        raise ConfigError(f"{field} must be a whole number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{field} must be finite, got {value!r}")
    low_ok = value >= minimum if min_inclusive else value > minimum
    if not low_ok or value > maximum:
        lo = "[" if min_inclusive else "("
        hi = "]" if math.isfinite(maximum) else ")"
        top = "inf" if not math.isfinite(maximum) else f"{maximum:g}"
        raise ConfigError(f"{field} must be in {lo}{minimum:g}, {top}{hi}, got {value!r}")


def describe_number(
    *,
    minimum: float = 0.0,
    maximum: float = math.inf,
    min_inclusive: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> str:
    """The allowed range in words, as the reference shows it: ``a number in (0, inf)``."""
    lo = "[" if min_inclusive else "("
    hi = "]" if math.isfinite(maximum) else ")"
    top = f"{maximum:g}" if math.isfinite(maximum) else "inf"
    kind = "a whole number" if integer else "a number"
    return f"{kind} in {lo}{minimum:g}, {top}{hi}" + (", or None" if optional else "")


def number(
    *,
    minimum: float = 0.0,
    maximum: float = math.inf,
    min_inclusive: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> Any:
    """An attrs validator built on :func:`check_number` (``optional`` lets None through)."""

    def validate(instance: object, attribute: Any, value: Any) -> None:
        if optional and value is None:
            return
        check_number(
            attribute.name,
            value,
            minimum=minimum,
            maximum=maximum,
            min_inclusive=min_inclusive,
            integer=integer,
        )

    # The docs' field tables read the range from here (docs/_ext/keepconn_reference.py).
    validate.__doc__ = describe_number(
        minimum=minimum,
        maximum=maximum,
        min_inclusive=min_inclusive,
        integer=integer,
        optional=optional,
    )
    return validate

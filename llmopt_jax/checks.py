"""Checks of config values that end in the one-line error every bad input gets: the field,
the value, and what it should have been."""

from __future__ import annotations

from typing import Any


def choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
  if isinstance(value, bool) or value not in allowed:
    raise ValueError(f'{field}={value!r}; choose from {list(allowed)}')


def int_at_least(field: str, value: Any, low: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < low:
    raise ValueError(f'{field}={value!r}: an integer >= {low}')

"""Metrics as (sum, count) pairs, reduced once at the end.

Every loss and metric function returns the *sum* of a quantity and the number of things summed
(tokens, examples). Sums add exactly across micro-batches, batches, devices and hosts; the mean
is taken once, in `finalize`, so an accuracy or a perplexity never depends on how the data was
split into batches (the lm1b example of Flax does the same).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

# name -> (sum, count); values are scalars (device arrays inside jit, numpy outside).
MetricSums = dict[str, tuple[Any, Any]]


def total(many: Iterable[Mapping[str, tuple[Any, Any]]]) -> dict[str, tuple[float, float]]:
  """Adds up a sequence of metric sums on the host (one device-to-host copy for all)."""
  many = jax.device_get(list(many))
  out: dict[str, tuple[float, float]] = {}
  for sums in many:
    for name, (s, c) in sums.items():
      prev_s, prev_c = out.get(name, (0.0, 0.0))
      out[name] = (prev_s + float(np.asarray(s, np.float64)), prev_c + float(c))
  return out


def finalize(sums: Mapping[str, tuple[float, float]]) -> dict[str, float]:
  """Means from sums; a mean `loss` also yields `perplexity` = exp(loss)."""
  means = {name: s / c if c else float('nan') for name, (s, c) in sums.items()}
  if 'loss' in means:
    means['perplexity'] = math.exp(min(means['loss'], 700.0))  # avoid overflow on divergence
  return means


def prefixed(means: Mapping[str, float], prefix: str) -> dict[str, float]:
  return {f'{prefix}/{name}': value for name, value in means.items()}

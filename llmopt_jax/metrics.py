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

# name -> (sum, count); sums are scalars (device arrays inside jit, numpy outside), except a
# 'confusion' matrix of counts, which `finalize` turns into macro-F1.
MetricSums = dict[str, tuple[Any, Any]]


def total(many: Iterable[Mapping[str, tuple[Any, Any]]]) -> dict[str, tuple[Any, float]]:
  """Adds up a sequence of metric sums on the host (one device-to-host copy for all).

  Scalar sums become floats; array sums (a confusion matrix of counts) are added elementwise
  in float64 and stay arrays, so they too are exact across batches and processes.
  """
  many = jax.device_get(list(many))
  out: dict[str, tuple[Any, float]] = {}
  for sums in many:
    for name, (s, c) in sums.items():
      prev_s, prev_c = out.get(name, (0.0, 0.0))
      s = np.asarray(s, np.float64)
      out[name] = (prev_s + (s if s.ndim else float(s)), prev_c + float(c))
  return out


def finalize(sums: Mapping[str, tuple[Any, float]]) -> dict[str, float]:
  """Means from sums; a mean `loss` also yields `perplexity` = exp(loss).

  A `confusion` matrix ([C, C] counts, rows true, columns predicted) is not averaged: it
  yields `macro_f1`, a statistic of the whole matrix that no mean of per-batch values gives.
  """
  means = {}
  for name, (s, c) in sums.items():
    if name == 'confusion':
      means['macro_f1'] = macro_f1(np.asarray(s))
    elif np.ndim(s):
      raise ValueError(f'metric {name!r} is an array of shape {np.shape(s)}; only '
                       "'confusion' may be one")
    else:
      means[name] = s / c if c else float('nan')
  if 'loss' in means:
    means['perplexity'] = math.exp(min(means['loss'], 700.0))  # avoid overflow on divergence
  return means


def f1_per_class(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(F1 per class, whether the class occurs) from counts [C, C] (rows true, columns predicted).

  F1_c = 2 TP / (2 TP + FP + FN). A class with TP + FP + FN = 0, absent from both the labels
  and the predictions, has no defined F1: it gets NaN and `occurs` False.
  """
  confusion = np.asarray(confusion, np.float64)
  tp = np.diag(confusion)
  fp = confusion.sum(axis=0) - tp  # predicted c, but another class
  fn = confusion.sum(axis=1) - tp  # class c, predicted as another
  denominator = 2 * tp + fp + fn
  occurs = denominator > 0
  f1 = np.divide(2 * tp, denominator, out=np.full_like(tp, np.nan), where=occurs)
  return f1, occurs


def macro_f1(confusion: np.ndarray) -> float:
  """Mean F1 over the classes that occur in the labels or the predictions.

  Classes absent from both are left out rather than counted as 0 or 1: a validation set
  without some rare class should not move the score (scikit-learn's f1_score(average='macro')
  does the same by default). NaN when no class occurs (an empty matrix).
  """
  f1, occurs = f1_per_class(confusion)
  return float(f1[occurs].mean()) if occurs.any() else float('nan')


def prefixed(means: Mapping[str, float], prefix: str) -> dict[str, float]:
  return {f'{prefix}/{name}': value for name, value in means.items()}

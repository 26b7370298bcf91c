"""The statistics of an ablation: a mean with its spread and interval, and paired differences.

A variant run over a few seeds is a small sample, so its mean comes with the sample standard
deviation (ddof=1) and a Student t interval, mean +- t_{n-1} * std / sqrt(n), which is honest
for n as small as 2 where a normal interval would be too narrow. Two variants run on the same
seeds share each seed's data order and initialisation, so their difference is judged per seed
(a paired t interval over the seeds both have): the seed-to-seed noise that both share cancels,
and a difference smaller than either variant's own spread can still be told apart from zero.

With one value there is no spread: std and the interval are NaN, never an error, so a study
still reports while its seeds are running.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats as scipy_stats


class Summary(NamedTuple):
  """n values as mean +- std (sample, ddof=1) and a t interval; NaN where n is too small."""
  n: int
  mean: float
  std: float
  ci_low: float
  ci_high: float


def summary(values: Sequence[float], confidence: float = 0.95) -> Summary:
  """The mean, sample standard deviation and `confidence` t interval of `values`."""
  x = np.asarray(values, dtype=np.float64)
  n = int(x.size)
  if n == 0:
    return Summary(0, math.nan, math.nan, math.nan, math.nan)
  mean = float(x.mean())
  if n == 1:
    return Summary(1, mean, math.nan, math.nan, math.nan)
  std = float(x.std(ddof=1))
  half_width = float(scipy_stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * std / math.sqrt(n)
  return Summary(n, mean, std, mean - half_width, mean + half_width)


def paired_difference(a_by_seed: Mapping[int, float], b_by_seed: Mapping[int, float],
                      confidence: float = 0.95) -> Summary:
  """The summary of a - b per seed, over the seeds both have (n = how many they share)."""
  shared = sorted(set(a_by_seed) & set(b_by_seed))
  return summary([a_by_seed[s] - b_by_seed[s] for s in shared], confidence)


@dataclasses.dataclass(frozen=True)
class AblationRow:
  """One variant of an ablation table: its summary over seeds and, unless it is the baseline
  (or there is none), its paired difference from the baseline (variant - baseline)."""
  variant: str
  summary: Summary
  vs_baseline: Summary | None


def ablation(values: Mapping[str, Mapping[int, float]], baseline: str | None,
             maximize: bool) -> list[AblationRow]:
  """The ablation table of `values` (variant -> seed -> metric), best mean first; variants
  without values last. Differences are against `baseline` when it is one of the variants."""
  has_baseline = bool(baseline) and baseline in values
  rows = [AblationRow(name, summary(list(by_seed.values())),
                      paired_difference(by_seed, values[baseline])
                      if has_baseline and name != baseline else None)
          for name, by_seed in values.items()]

  def rank_key(row: AblationRow) -> tuple[bool, float]:
    mean = row.summary.mean
    return (math.isnan(mean), -mean if maximize else mean)

  return sorted(rows, key=rank_key)

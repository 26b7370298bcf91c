"""Early stopping on an evaluation metric, as a small immutable record of the run so far.

The record lives in the checkpoint's progress item, so a resumed run stops at exactly the
evaluation an uninterrupted run would have stopped at.
"""

from __future__ import annotations

import dataclasses
import math

MODES = ('min', 'max')


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
  metric: str                 # e.g. 'eval/loss'
  mode: str                   # 'min' or 'max'
  patience: int               # evaluations without improvement before stopping; 0 = never stop
  min_delta: float = 0.0      # an improvement must beat the best by more than this
  best_value: float = math.nan
  best_step: int = -1
  bad_evals: int = 0
  should_stop: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'config.early_stopping.mode={self.mode!r}; choose from {MODES}')
    if self.patience < 0:
      raise ValueError(f'config.early_stopping.patience={self.patience} must be >= 0')

  def improved(self, value: float) -> bool:
    if math.isnan(self.best_value):
      return not math.isnan(value)
    if self.mode == 'min':
      return value < self.best_value - self.min_delta
    return value > self.best_value + self.min_delta

  def update(self, step: int, metrics: dict[str, float]) -> EarlyStopping:
    """The record after an evaluation at `step` that produced `metrics`."""
    if self.metric not in metrics:
      raise ValueError(
          f'config.early_stopping.metric={self.metric!r} is not an eval metric; '
          f'available: {sorted(metrics)}')
    value = metrics[self.metric]
    if self.improved(value):
      return dataclasses.replace(self, best_value=value, best_step=step, bad_evals=0)
    bad = self.bad_evals + 1
    return dataclasses.replace(
        self, bad_evals=bad, should_stop=self.patience > 0 and bad >= self.patience)

  def to_json(self) -> dict:
    best = None if math.isnan(self.best_value) else self.best_value  # JSON has no NaN
    return {'best_value': best, 'best_step': self.best_step, 'bad_evals': self.bad_evals,
            'should_stop': self.should_stop}

  def with_json(self, record: dict) -> EarlyStopping:
    best = math.nan if record['best_value'] is None else float(record['best_value'])
    return dataclasses.replace(
        self, best_value=best, best_step=int(record['best_step']),
        bad_evals=int(record['bad_evals']), should_stop=bool(record['should_stop']))

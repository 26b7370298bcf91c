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
  min_delta: float = 0.0      # gains smaller than this still count as evaluations without
                              # improvement (the best is still tracked exactly)
  best_value: float = math.nan
  best_step: int = -1
  bad_evals: int = 0
  should_stop: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'config.early_stopping.mode={self.mode!r}; choose from {MODES}')
    if self.patience < 0:
      raise ValueError(f'config.early_stopping.patience={self.patience} must be >= 0')

  def beats_best(self, value: float, margin: float = 0.0) -> bool:
    if math.isnan(self.best_value):
      return not math.isnan(value)
    if self.mode == 'min':
      return value < self.best_value - margin
    return value > self.best_value + margin

  def update(self, step: int, metrics: dict[str, float]) -> EarlyStopping:
    """The record after an evaluation at `step` that produced `metrics`.

    The best (value, step) moves on any strict improvement, so it always names the checkpoint
    that keep-best preserves; patience is only reset by a gain larger than `min_delta`.
    """
    if self.metric not in metrics:
      raise ValueError(
          f'config.early_stopping.metric={self.metric!r} is not an eval metric; '
          f'available: {sorted(metrics)}')
    value = metrics[self.metric]
    enough = self.beats_best(value, self.min_delta)
    record = self
    if self.beats_best(value):
      record = dataclasses.replace(record, best_value=value, best_step=step)
    bad = 0 if enough else self.bad_evals + 1
    return dataclasses.replace(
        record, bad_evals=bad, should_stop=self.patience > 0 and bad >= self.patience)

  def to_json(self) -> dict:
    best = None if math.isnan(self.best_value) else self.best_value  # JSON has no NaN
    return {'best_value': best, 'best_step': self.best_step, 'bad_evals': self.bad_evals,
            'should_stop': self.should_stop}

  def with_json(self, record: dict) -> EarlyStopping:
    best = math.nan if record['best_value'] is None else float(record['best_value'])
    return dataclasses.replace(
        self, best_value=best, best_step=int(record['best_step']),
        bad_evals=int(record['bad_evals']), should_stop=bool(record['should_stop']))

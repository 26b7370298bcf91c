"""A multi-task run's mixture: which task each training batch comes from.

Rates (`mixture_rates`), as in T5/seqio: 'proportional' to each task's number of training
examples (each capped at `cap` first, if given, so one huge task cannot drown the rest),
'temperature' (proportional to size^(1/T): T = 1 is proportional, larger T flattens toward
uniform, the multilingual-T5 recipe), or 'explicit' (given per task, normalised).

The schedule (`TaskMixture`) is deterministic stride scheduling rather than a random draw per
batch: batch n goes to the task furthest behind its share, argmax_i(rate_i * (n + 1) -
count_i), ties to the earlier task. Every prefix of the run then holds each task within one
batch of its rate (|count_i - rate_i * n| < 1), where i.i.d. draws would wander by
sqrt(n * rate * (1 - rate)) batches; order within a task is the task's own shuffled pipeline.
The mixer's state is the count of batches each task has had, JSON-ready ints saved with
each checkpoint, so a resumed run draws the very tasks an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

MIXINGS = ('proportional', 'temperature', 'explicit')


def mixture_rates(sizes: Mapping[str, int], mixing: str, *, temperature: float = 1.0,
                  explicit: Mapping[str, float] | None = None, cap: int = 0,
                  field: str = 'config.mixture') -> dict[str, float]:
  """Each task's share of the batches, summing to 1 (one-line errors naming `field`)."""
  if mixing not in MIXINGS:
    raise ValueError(f'{field}.mixing={mixing!r}; choose from {list(MIXINGS)}')
  if cap < 0:
    raise ValueError(f'{field}.cap={cap}: examples per task, >= 0 (0 = no cap)')
  if mixing == 'explicit':
    given = dict(explicit or {})
    unknown = sorted(set(given) - set(sizes))
    missing = sorted(set(sizes) - set(given))
    if unknown or missing:
      raise ValueError(f'{field}.rates: ' + (f'{unknown[0]!r} is not a task' if unknown else
                       f'no rate for task {missing[0]!r}') + f'; the tasks are {list(sizes)}')
    weights = given
  else:
    if not temperature > 0:
      raise ValueError(f'{field}.temperature={temperature}: a number > 0')
    t = temperature if mixing == 'temperature' else 1.0
    weights = {name: min(size, cap or size) ** (1.0 / t) for name, size in sizes.items()}
  bad = [name for name, w in weights.items() if not w >= 0]
  if bad or not sum(weights.values()) > 0:
    raise ValueError(f'{field}: rates must be >= 0 and not all 0; got {weights}')
  total = sum(weights.values())
  return {name: float(w) / total for name, w in weights.items()}


class TaskMixture:
  """The task of each successive batch; exactly resumable from `get_state()`."""

  def __init__(self, rates: Mapping[str, float], state: Mapping[str, int] | None = None):
    self.tasks: Sequence[str] = tuple(rates)
    self._rates = np.array([rates[t] for t in self.tasks], np.float64)
    self._counts = np.zeros(len(self.tasks), np.int64)
    if state is not None:
      self.set_state(state)

  def next(self) -> str:
    n = int(self._counts.sum())
    k = int(np.argmax(self._rates * (n + 1) - self._counts))
    self._counts[k] += 1
    return self.tasks[k]

  def get_state(self) -> dict[str, int]:
    return {t: int(c) for t, c in zip(self.tasks, self._counts, strict=True)}

  def set_state(self, state: Mapping[str, int]) -> None:
    if set(state) != set(self.tasks):
      raise ValueError(f'mixture state {dict(state)} is for tasks {sorted(state)}, not '
                       f'{sorted(self.tasks)}: the run was started with other tasks')
    self._counts = np.array([int(state[t]) for t in self.tasks], np.int64)

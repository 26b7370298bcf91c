"""Schedules of a scalar over training steps: the distillation weight alpha and temperature.

alpha blends the hard-label loss and the distillation loss, and the temperature softens both
distributions; either may move over training (e.g. a high temperature early, when the
student is far from the teacher, annealed towards 1). A schedule is a small frozen dataclass,
a function of the step that works on a traced step inside the jitted train step, and
hashable, so it can also be a static argument.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

SCHEDULES = ('constant', 'linear', 'cosine')


@dataclasses.dataclass(frozen=True)
class Schedule:
  """start -> end over num_steps steps, then held at end. See `make`."""
  kind: str
  start: float
  end: float
  num_steps: int

  def __call__(self, step: int | jax.Array) -> jax.Array:
    """float32 value at `step` (python int or traced int)."""
    if self.kind == 'constant':
      return jnp.asarray(self.start, jnp.float32)
    t = jnp.clip(jnp.asarray(step, jnp.float32) / self.num_steps, 0.0, 1.0)
    if self.kind == 'cosine':
      # Half a cosine: flat at both ends, so the value moves slowly at the start and settles.
      t = (1.0 - jnp.cos(math.pi * t)) / 2.0
    return (self.start + (self.end - self.start) * t).astype(jnp.float32)


def make(kind: str, start: float, end: float, num_steps: int, *,
         field: str = 'schedule') -> Schedule:
  """A schedule from `start` at step 0 to `end` at `num_steps`, in either direction.

  With t = clip(step / num_steps, 0, 1): 'constant' -> start; 'linear' -> start +
  (end - start) t; 'cosine' -> start + (end - start) (1 - cos(pi t)) / 2.

  Args:
    kind: one of SCHEDULES.
    start: value at step 0.
    end: value from step num_steps on (ignored by 'constant').
    num_steps: steps from start to end, > 0.
    field: the config field being built, to name it in errors.

  Returns:
    A callable step -> float32 scalar.
  """
  if kind not in SCHEDULES:
    raise ValueError(f'{field}={kind!r}; choose from {SCHEDULES}')
  if num_steps <= 0:
    raise ValueError(f'{field}: num_steps={num_steps}; must be positive')
  return Schedule(kind, float(start), float(end), int(num_steps))

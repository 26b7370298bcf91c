"""Per-step metrics between log lines, the NaN/Inf guard, and the tokens/s counter."""

from __future__ import annotations

import time
from typing import Any

import jax

from llmopt_jax import metrics as metrics_lib
from llmopt_jax.train import interrupt
from llmopt_jax.train.checkpoint import Checkpoints


class NonFiniteError(RuntimeError):
  """A loss or gradient became NaN/Inf; the message names the step."""


class Window:
  """Per-step metrics since the last log line, kept on device until they are needed.

  Fetching them only at log, eval and checkpoint time avoids a host sync per step; the NaN/Inf
  guard still names the exact first bad step, and runs before any checkpoint is written, so
  the last good checkpoint is never replaced by a poisoned one.
  """

  def __init__(self, checkpoints: Checkpoints, start: int, ctrl_c: interrupt.CtrlC | None = None):
    self.checkpoints = checkpoints
    self.last_step = start  # the last step dispatched
    self.ctrl_c = ctrl_c  # pressed: leave the loop after the step just added
    self._pending: list[tuple[int, Any]] = []
    self._unchecked = 0

  def wait_for_previous(self) -> None:
    if self._pending:
      jax.block_until_ready(self._pending[-1][1]['finite'][0])

  def add(self, step: int, step_metrics) -> None:
    self._pending.append((step, step_metrics))
    self.last_step = step
    if self.ctrl_c is not None and self.ctrl_c.pressed:
      raise interrupt.Stop()
    self._unchecked += 1

  def check_finite(self) -> None:
    unchecked = self._pending[len(self._pending) - self._unchecked:]
    flags = jax.device_get([m['finite'][0] for _, m in unchecked])
    self._unchecked = 0
    for (step, _), ok in zip(unchecked, flags):
      if not ok:
        last_good = self.checkpoints.latest_step()
        kept = (f'the last checkpoint (step {last_good}, checksummed) holds the state before it'
                if last_good is not None else 'no checkpoint had been written yet')
        raise NonFiniteError(f'non-finite loss or gradient at step {step}; {kept}')

  def flush(self) -> dict[str, float]:
    self.check_finite()
    means = metrics_lib.finalize(metrics_lib.total(m for _, m in self._pending))
    means.pop('finite', None)
    self._pending = []
    return means


class Throughput:
  def __init__(self):
    self._since = time.perf_counter()
    self._tokens = 0

  def count(self, tokens: int) -> None:
    self._tokens += tokens

  def rate(self) -> float:
    now = time.perf_counter()
    rate = self._tokens / max(now - self._since, 1e-9)
    self._since, self._tokens = now, 0
    return rate

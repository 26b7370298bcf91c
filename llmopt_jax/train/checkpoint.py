"""Checkpoints in the workdir: Orbax, asynchronous, keep-last-N plus best-K, exact resume.

A checkpoint holds two items:
  state     the TrainState (params, optimizer state, step), sharded arrays
  progress  JSON: the data iterator's position, the early-stopping record, whether the run
            finished; everything else the loop needs to continue as if never interrupted.

Orbax writes each step into a temporary directory and renames it only once complete, so a run
killed mid-save leaves no checkpoint that a restart could pick up half-written.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


@dataclasses.dataclass(frozen=True)
class BestByMetric:
  """Orbax preservation policy: keep the `n` checkpoints with the best `metric`.

  Unlike Orbax's `BestN`, a tie goes to the *earlier* step, the one early stopping reports as
  best (it only moves on a strict improvement). Checkpoints saved without metrics are left to
  the other policies.
  """
  metric: str
  mode: str
  n: int

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
    del context
    sign = 1.0 if self.mode == 'min' else -1.0
    ranked = sorted(
        (sign * _metric(c.metrics, self.metric), c.step, i) for i, c in enumerate(checkpoints)
        if c.metrics is not None and not math.isnan(_metric(c.metrics, self.metric)))
    keep = {i for _, _, i in ranked[:self.n]}
    return [i in keep for i in range(len(checkpoints))]


def _metric(metrics: dict, name: str) -> float:
  return float(metrics.get(name, math.nan))


class Checkpoints:
  """A thin, explicit face over `ocp.CheckpointManager` for the training loop."""

  def __init__(
      self,
      directory: str,
      *,
      keep_last: int,
      keep_best: int,
      best_metric: str,
      best_mode: str,
      async_save: bool = True,
  ):
    if best_mode not in ('min', 'max'):
      raise ValueError(f"config.early_stopping.mode={best_mode!r}; choose 'min' or 'max'")
    keep = [policies.LatestN(n=max(keep_last, 1))]
    if keep_best > 0:
      keep.append(BestByMetric(best_metric, best_mode, keep_best))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep),
        enable_async_checkpointing=async_save,
        create=True,
    )
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(
      self, step: int, state: Any, progress: dict, metrics: dict[str, float] | None = None
  ) -> None:
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)),
        metrics=metrics,
        force=True,
    )

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """The state, placed with the shardings of `abstract_state`, and the progress record."""
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), progress=ocp.args.JsonRestore()),
    )
    return restored['state'], restored['progress']

  def restore_progress(self, step: int) -> dict:
    restored = self._manager.restore(
        step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
    return restored['progress']

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

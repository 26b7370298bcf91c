"""Checkpoints in the workdir: Orbax, asynchronous, keep-last-N plus best-K, exact resume.

A checkpoint holds two items:
  state     the TrainState (params, optimizer state, step), sharded arrays
  progress  JSON: the data iterator's position, the early-stopping record, whether the run
            finished; everything else the loop needs to continue as if never interrupted.

Orbax writes each step into a temporary directory and renames it only once complete, so a run
killed mid-save leaves no checkpoint that a restart could pick up half-written.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


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
      keep.append(policies.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric],
          reverse=best_mode == 'min',  # BestN keeps the end of the sorted list
          n=keep_best,
          keep_checkpoints_without_metrics=False,
      ))
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

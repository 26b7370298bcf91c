"""Checkpoints in the workdir: Orbax, asynchronous, keep-last-N plus best-K, exact resume.

A checkpoint holds two items:
  state     the TrainState (params, optimizer state, step), sharded arrays
  progress  JSON: the data iterator's position, the early-stopping record, whether the run
            finished; everything else the loop needs to continue as if never interrupted.

Orbax writes each step into a temporary directory and renames it only once complete, so a run
killed mid-save leaves no checkpoint that a restart could pick up half-written. The progress
record also holds a checksum of every array of the state (`checksum.py`), verified on
restore: a step damaged on disk later (a flipped bit, a truncated or deleted file) is caught,
moved aside, and the run resumes from the newest step that verifies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from llmopt_jax import distributed
from llmopt_jax.train import checksum

# The progress record's entry holding the state's checksums, named with the algorithm's
# version: a later algorithm reads its own entry and leaves older checkpoints unverified.
CHECKSUMS = 'checksums_v1'


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


@dataclasses.dataclass(frozen=True)
class _StepInfo:
  """What the preservation policies read of a step (Orbax's `PolicyCheckpointInfo`)."""
  step: int
  metrics: dict | None
  time: Any = None


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
        # Orbax writes a step's metrics to disk (and reads them back when a run resumes, so
        # keep-best still knows the best step) only when a `best_fn` is given; the ranking
        # itself is `BestByMetric`'s.
        best_fn=lambda metrics: _metric(metrics, best_metric), best_mode=best_mode,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self.directory = os.path.abspath(directory)
    self._options = options
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(
      self, step: int, state: Any, progress: dict, metrics: dict[str, float] | None = None
  ) -> None:
    """Saves `state` and the JSON `progress` as `step`, with a checksum of every array of
    `state` in the progress record (verified when the step is restored)."""
    if jax.process_count() == 1:  # checksums need every array in one process
      progress = {**progress, CHECKSUMS: checksum.checksums(state)}
    self._check_space(step, state)
    with self._disk_errors(step):
      self._save(step, state, progress, metrics)

  def _save(self, step: int, state: Any, progress: dict, metrics) -> None:
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)),
        metrics=metrics,
        force=True,
    )

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """The state, placed with the shardings of `abstract_state`, and the progress record;
    raises `checksum.CorruptCheckpoint` if an array differs from what was saved."""
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), progress=ocp.args.JsonRestore()),
    )
    state, progress = restored['state'], restored['progress']
    checksum.verify(state, progress.get(CHECKSUMS, {}), f'{self.directory}/{step}')
    return state, progress

  def restore_newest_good(self, abstract_state: Any
                          ) -> tuple[int | None, Any, dict, list[str]]:
    """(step, state, progress, problems) of the newest checkpoint that reads back and
    verifies; (None, None, {}, problems) if none does. A step that fails is moved aside to
    `damaged-<step>` (kept for inspection, never deleted) and named in `problems`."""
    problems = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, progress = self.restore(step, abstract_state)
        return step, state, progress, problems
      except Exception as e:  # noqa: BLE001  (any failure to read a step means: fall back)
        problems.append(f'checkpoint {self.directory}/{step} cannot be used '
                        f'({type(e).__name__}: {" ".join(str(e).split())[:300]}); moved to '
                        f'{self._quarantine(step)}')
    return None, None, {}, problems

  def _quarantine(self, step: int) -> str:
    """Moves step `step` out of the manager's sight and reopens the manager."""
    self._manager.wait_until_finished()
    target = os.path.join(self.directory, f'damaged-{step}')
    suffix = 0
    while os.path.exists(target + (f'.{suffix}' if suffix else '')):
      suffix += 1
    target += f'.{suffix}' if suffix else ''
    if jax.process_index() == 0:
      os.rename(os.path.join(self.directory, str(step)), target)
    distributed.barrier(f'quarantine_{step}')
    self._manager.close()
    self._manager = ocp.CheckpointManager(self.directory, options=self._options)
    return target

  def apply_retention(self) -> list[int]:
    """Deletes the steps the keep-last/keep-best policy no longer keeps; returns them. Orbax
    applies the policy after each save, so only a run killed between a save and its cleanup
    leaves such steps; a rerun that has nothing left to train calls this instead."""
    infos = [_StepInfo(step, self._manager.metrics(step)) for step in sorted(self.all_steps())]
    keep = self._options.preservation_policy.should_preserve(
        infos, context=policies.PreservationContext())
    stale = [info.step for info, kept in zip(infos, keep) if not kept]
    for step in stale:
      self._manager.delete(step)
    return stale

  def restore_progress(self, step: int) -> dict:
    restored = self._manager.restore(
        step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
    return restored['progress']

  def wait(self) -> None:
    with self._disk_errors(None):
      self._manager.wait_until_finished()

  def _check_space(self, step: int, state: Any) -> None:
    """Refuses to start a save the disk cannot hold (the arrays' bytes, plus a margin for
    metadata): failing here is clean, while a save that fills the disk fails in Orbax's and
    TensorStore's background threads."""
    needed = int(1.05 * sum(x.nbytes for x in jax.tree.leaves(state))) + 2**20
    free = shutil.disk_usage(self.directory).free
    if free < needed:
      raise OSError(errno.ENOSPC, f'{self.directory}: no space left on device for step {step} '
                    f'({needed / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free); the last '
                    f'complete checkpoint is step {self.latest_step()}; free space and rerun '
                    f'the same command to resume')

  @contextlib.contextmanager
  def _disk_errors(self, step: int | None) -> Iterator[None]:
    """A full disk (raised by Orbax or TensorStore in any wrapping) as one line naming the
    directory and the last complete checkpoint; Orbax removes the partial step's temporary
    directory when the run is restarted."""
    try:
      yield
    except Exception as e:  # noqa: BLE001  (re-raised unless it is a full disk)
      if not _is_disk_full(e):
        raise
      what = 'a checkpoint' if step is None else f'step {step}'
      raise OSError(errno.ENOSPC, f'{self.directory}: no space left on device while saving '
                    f'{what}; the last complete checkpoint is step {self.latest_step()}; free '
                    f'space and rerun the same command to resume') from None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _is_disk_full(error: BaseException | None) -> bool:
  while error is not None:
    if getattr(error, 'errno', None) in (errno.ENOSPC, errno.EDQUOT) or (
        'No space left on device' in str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False

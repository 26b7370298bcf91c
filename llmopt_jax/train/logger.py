"""What a run reports: a progress bar, JSON-lines metrics and TensorBoard events.

Only process 0 writes; on the other processes every method is a no-op, so the loop can call
the logger unconditionally.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

import jax
import tqdm


def _summary_writer() -> type:
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX imports torch at import time when it is installed, only to accept torch
  tensors as values: 3 to 5 seconds of every run's start on a 2-core CPU (torch is in the test
  environment), for scalars that are Python floats here. Hiding torch for the duration of the
  import makes that `import torch` fail as if torch were absent (tensorboardX handles that);
  a process that already imported torch keeps it. Imported here, not at the top, so that
  stages that log no training (predict, generate, serve) skip tensorboardX altogether.
  """
  if 'torch' in sys.modules or 'tensorboardX' in sys.modules:
    from tensorboardX import SummaryWriter  # noqa: PLC0415
    return SummaryWriter
  sys.modules['torch'] = None  # an ImportError for `import torch`, for now
  try:
    from tensorboardX import SummaryWriter  # noqa: PLC0415
  finally:
    del sys.modules['torch']
  return SummaryWriter


class Logger:
  def __init__(self, workdir: str, *, total_steps: int, start_step: int):
    self.primary = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if not self.primary:
      return
    _drop_records_after(self.path, start_step)
    self._jsonl = open(self.path, 'a', encoding='utf-8')
    self._tb = _summary_writer()(os.path.join(workdir, 'tensorboard'), purge_step=start_step + 1)
    # A live bar on a terminal; in a log file (CI, a cluster job) plain lines at log steps.
    self._interactive = sys.stderr.isatty()
    self._total = total_steps
    self._bar = tqdm.tqdm(
        total=total_steps, initial=start_step, unit='step', dynamic_ncols=True,
        file=sys.stderr, disable=not self._interactive)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Appends one record to metrics.jsonl and the TensorBoard events."""
    if not self.primary:
      return
    self._jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tb.add_scalar(name, value, step)

  def progress(self, step: int, **shown: float) -> None:
    """Moves the bar to `step` and shows a few numbers (loss, tokens/s) beside it."""
    if not self.primary:
      return
    self._bar.update(step - self._bar.n)
    if not shown:
      return
    if self._interactive:
      self._bar.set_postfix({k: f'{v:.4g}' for k, v in shown.items()}, refresh=False)
    else:
      numbers = ', '.join(f'{k}={v:.4g}' for k, v in shown.items())
      print(f'step {step}/{self._total}: {numbers}', file=sys.stderr, flush=True)

  def info(self, message: str) -> None:
    if self.primary:
      tqdm.tqdm.write(message, file=sys.stderr)

  def close(self) -> None:
    if not self.primary:
      return
    self._bar.close()
    self._jsonl.close()
    self._tb.close()

  def abandon(self) -> None:
    """Closes what can be closed when the run fails: the error that stopped it (a full disk,
    say) is the one to report, not a second one from flushing the logs."""
    try:
      self.close()
    except OSError:
      pass


def _drop_records_after(path: str, step: int) -> None:
  """On resume, forgets records past the restored step: they are about to be redone."""
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    lines = f.readlines()
  kept = [line for line in lines if _record_step(line) <= step]
  if len(kept) == len(lines):
    return
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.writelines(kept)
  os.replace(tmp, path)


def _record_step(line: str) -> float:
  try:
    return json.loads(line)['step']
  except (ValueError, KeyError, TypeError):
    return float('inf')  # a line cut short by a kill: drop it

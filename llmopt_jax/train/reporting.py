"""A run's evaluations, seen from outside the loop: how a sweep prunes a trial mid-run.

The training loop knows nothing of sweeps. After each periodic evaluation (and its
checkpoint) it calls `report(step, metrics)`, which hands the metrics to whoever is watching
this run, if anyone: a sweep's trial wraps the run in `with on_eval(watch): ...`, and `watch`
passes the value to Optuna's pruner. When the pruner says stop, `watch` raises `StopRun`;
the loop then lets its checkpoint saves finish, closes its logs, writes no summary.json (the
run is not finished: rerunning its command resumes it from that checkpoint), and re-raises,
so the trial is recorded as pruned.

The watcher lives in a context variable, not in the loop's arguments: every stage reaches the
loop through its own code, and none of them has to pass a sweep's callback down.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping

Watcher = Callable[[int, Mapping[str, float]], None]

_watcher: contextvars.ContextVar[Watcher | None] = contextvars.ContextVar(
    'llmopt_eval_watcher', default=None)


class StopRun(Exception):
  """Raised by a watcher: stop this run now, cleanly, without a finished record."""


@contextlib.contextmanager
def on_eval(watch: Watcher) -> Iterator[None]:
  """Runs the body with `watch(step, eval_metrics)` called after each evaluation."""
  token = _watcher.set(watch)
  try:
    yield
  finally:
    _watcher.reset(token)


def report(step: int, metrics: Mapping[str, float]) -> None:
  """Gives an evaluation's metrics to this run's watcher, if any; may raise `StopRun`."""
  watch = _watcher.get()
  if watch is not None:
    watch(step, metrics)

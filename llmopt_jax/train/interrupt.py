"""Ctrl-C during training: the loop stops at a step boundary and says where to resume."""

from __future__ import annotations

import signal
import threading


class Interrupted(KeyboardInterrupt):
  """Ctrl-C (SIGINT) during training; the message says where the run can resume from."""


class Stop(Exception):
  """Ctrl-C was pressed: leave the loop at a step boundary."""


class CtrlC:
  """While active, Ctrl-C (SIGINT) only sets `pressed`, which the loop reads after each
  step: an interrupt never lands inside a checkpoint write or a collective. A second Ctrl-C
  interrupts at once."""

  def __init__(self):
    self.pressed = False
    self._previous = None

  def __enter__(self) -> CtrlC:
    # Only the main thread may set handlers; a process that ignores SIGINT keeps ignoring it.
    if (threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN):
      self._previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)

  def _handle(self, signum, frame) -> None:
    if self.pressed:
      raise KeyboardInterrupt
    self.pressed = True

"""Command-line plumbing shared by main.py and the experiment scripts: one-line errors.

absl and ml_collections report a bad `--config` in several shapes: a flag error carrying the
whole traceback of `get_config`, or an unwrapped AttributeError/KeyError for an override of a
field the config does not have. A researcher should see one line naming the problem instead.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from absl import flags


def one_line(error: BaseException | str) -> str:
  return ' '.join(str(error).split())


def fail(message: str) -> NoReturn:
  print(f'error: {one_line(message)}', file=sys.stderr)
  sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every mistake in `--config...` reported on one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(_flag_error_message(str(e), argv))
  except (AttributeError, KeyError) as e:
    fail(_missing_field_message(e, argv))


def _flag_error_message(text: str, argv: list[str]) -> str:
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  if len(lines) == 1:
    return lines[0]
  # An exception raised in get_config: ml_collections appends its traceback; the last line
  # is 'SomeError: message'.
  config_arg = next((a for a in argv if a.startswith('--config=')), '--config')
  return f'{config_arg}: {lines[-1].partition(": ")[2] or lines[-1]}'


def _missing_field_message(error: BaseException, argv: list[str]) -> str:
  # ml_collections nests a KeyError("'lrr'\nDid you mean "lr" instead of "lrr"?") inside.
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  key, _, hint = str(error.args[0] if error.args else error).partition('\n')
  key = key.strip("'")
  overrides = [a.partition('=')[0] for a in argv[1:] if a.startswith('--config.')]
  named = [o for o in overrides if key in o.split('.')] or [key]
  return f'{", ".join(named)}: no such field in the config. {hint}'


class _OneLineLibraryErrors(logging.Filter):
  """Error records of Orbax's background threads (a failed save) as one line each, without
  the traceback: the error itself reaches main.py as an exception and becomes its last line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if 'did not provide metrics' in str(record.msg):  # a checkpoint between evaluations
      return False
    if f'{os.sep}orbax{os.sep}' in record.pathname and record.exc_info:
      record.msg, record.args = one_line(record.getMessage()), ()
      record.exc_info = record.exc_text = None
    return True


def quiet_library_tracebacks() -> None:
  """Installs `_OneLineLibraryErrors` (LLMOPT_TRACEBACK=1 keeps the tracebacks)."""
  if not os.environ.get('LLMOPT_TRACEBACK'):
    for handler in logging.getLogger().handlers + logging.getLogger('absl').handlers:
      handler.addFilter(_OneLineLibraryErrors())
    logging.getLogger('absl').addFilter(_OneLineLibraryErrors())


def run_reporting_errors(fn: Callable[[], object], expected: tuple[type, ...]) -> None:
  """Runs `fn`; an expected error (bad input) becomes one line on stderr and exit code 1,
  an interrupt (Ctrl-C) one line and exit code 130.

  LLMOPT_TRACEBACK=1 re-raises instead, for debugging.
  """
  try:
    fn()
  except expected as e:
    if os.environ.get('LLMOPT_TRACEBACK'):
      raise
    fail(str(e))
  except KeyboardInterrupt as e:  # Ctrl-C: one line, and the shell's exit code for SIGINT
    if os.environ.get('LLMOPT_TRACEBACK'):
      raise
    print(f'error: {one_line(e) or "interrupted; rerun the same command to resume"}',
          file=sys.stderr)
    sys.exit(130)

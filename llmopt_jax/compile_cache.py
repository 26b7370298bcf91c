"""The persistent XLA compilation cache every run shares: a second run skips compiling.

A run's programs (the train step, evaluation, generation) are compiled by XLA on first use;
on a 2-core CPU that is seconds to tens of seconds of every start. JAX can keep compiled
programs on disk, keyed by the program, the compiler and the devices, so a later run with the
same shapes (a rerun, a resumed run, the next trial of a sweep, the test suite) loads them
instead. main.py turns it on in `~/.cache/llmopt_jax/xla` unless told otherwise:
`--compilation_cache=DIR` moves it, `--compilation_cache=` switches it off, and a
JAX_COMPILATION_CACHE_DIR set in the environment wins (the test suite sets its own).

Every program is kept, however quickly it compiled: JAX's default keeps only those that took
a second or more, but a run's start is mostly programs of a fraction of a second each (the
evaluation, the metrics, the initialisation, checkpoint restores): profiled on two busy cores,
20 such compiles took 15 of the 29 seconds a tiny fine-tune ran, so that default saved little.
A JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS in the environment wins. The directory is an LRU
of at most MAX_BYTES, so it cannot grow without bound. Correctness does not depend on it: a
missing, stale or unwritable entry means compiling again.
"""

from __future__ import annotations

import os

import jax

DEFAULT_DIR = os.path.join('~', '.cache', 'llmopt_jax', 'xla')
MAX_BYTES = 4 * 2**30
MIN_COMPILE_TIME_S = 0.0


def enable(directory: str) -> str | None:
  """Turns the cache on in `directory` ('' = off); returns the directory in use, if any."""
  from_environment = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  if from_environment:
    return from_environment  # JAX reads it itself
  if not directory:
    return None
  path = os.path.abspath(os.path.expanduser(directory))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise OSError(f'--compilation_cache={directory}: cannot create it ({e.strerror}); give '
                  f"another directory, or --compilation_cache= to run without one") from None
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_compilation_cache_max_size', MAX_BYTES)
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_TIME_S)
  return path

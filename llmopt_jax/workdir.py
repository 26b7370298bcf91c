"""The run directory: created on first use, locked for the whole run, and its config checked
against the run already there before anything is written.

* **Lock.** Process 0 holds an exclusive `flock` on `<workdir>/lock` for as long as it lives
  (the other processes of a multi-process run learn its result), and writes the holder
  (host, pid, start time) into it. A second run on the same workdir fails at once with one
  line naming the holder. The kernel drops the lock when its process dies, however it dies,
  so a killed run's lock is taken over by the next run (which says so); no stale lock can
  block a workdir.
* **Shared.** A sweep's directory is worked in by many processes at once (its workers, each
  running one trial at a time in its own locked trial workdir): `prepare(..., shared=True)`
  takes a shared lock instead, which any number of workers hold together and which keeps a
  single run out (and the reverse), and still checks and records the config. A worker
  `release`s each trial's workdir when the trial ends, so the trial can be rerun alone.
* **Config.** `config.json` is the record of the command that runs in the workdir. It is
  replaced only after the new config has been compared with it: a workdir that already holds
  training (checkpoints, a summary, a model card or a report) refuses another stage or a
  change to any field that would mix two experiments (model, data, optimizer, seed, ...),
  naming the fields; compatible changes (more steps, other intervals, another mesh) are
  allowed. Every accepted config is appended to `config_history.jsonl`, so nothing of an
  earlier command is lost.
"""

from __future__ import annotations

import atexit
import datetime
import fcntl
import json
import os
import socket

import jax
import ml_collections

from llmopt_jax import distributed

LOCK = 'lock'
CONFIG = 'config.json'
HISTORY = 'config_history.jsonl'
# Fields a resumed run may change: how long and how often it trains, evaluates and saves,
# where it runs, the configs of sub-runs (each checked in its own workdir), and how inference
# batches its work (results do not depend on it).
COMPATIBLE = ('train.num_steps', 'train.log_every', 'train.eval_every', 'train.eval_batches',
              'checkpoint.', 'early_stopping.patience', 'mesh.', 'test_batches', 'export',
              'data.tfds_data_dir', 'data.num_shards', 'variants', 'teacher.config.',
              'source.config.', 'sparsities', 'quant_variants', 'batch_size', 'engine.',
              'sweep.trials', 'sweep.heartbeat_s', 'sweep.max_retries', 'multitask.baselines',
              # How rewrites are fetched, not what they are (kept.json fixes those of a run).
              'data.rewrite.concurrency', 'data.rewrite.timeout_s', 'data.rewrite.batch_size',
              'data.rewrite.api_key_env')
_FINISHED = ('summary.json', 'model.json', 'report.json')
_SWEEP_TRIALS = 'trials'  # a sweep's trial workdirs: its config binds once a trial started

_held: dict[str, int] = {}  # lock file -> open descriptor, for the locks this process holds


class WorkdirInUse(OSError):
  """Another live run holds the workdir."""


def prepare(workdir: str, config: ml_collections.ConfigDict, *, shared: bool = False) -> str:
  """Creates `workdir` (or reuses it to resume), locks it (exclusively, or `shared` with
  other workers of the same sweep), checks `config` against the run already there, and
  records it."""
  if not workdir:
    raise ValueError('--workdir is required')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f'--workdir={workdir} is a file, not a directory')
  os.makedirs(workdir, exist_ok=True)
  problem = _acquire(workdir, shared) if jax.process_index() == 0 else ''
  if jax.process_count() > 1:
    problem = distributed.allgather_json(problem)[0]  # every process fails alike
  if problem:
    raise WorkdirInUse(problem)
  new = json.loads(config.to_json_best_effort(sort_keys=True))
  changed = _check_compatible(workdir, new)
  if jax.process_index() == 0:
    _record(workdir, new, changed)
  return workdir


def _acquire(workdir: str, shared: bool = False) -> str:
  """Takes the workdir's lock for this process; '' on success, else why not (one line)."""
  path = os.path.realpath(os.path.join(workdir, LOCK))
  if path in _held:
    return ''
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _holder(fd) or 'the workers of a sweep'  # shared holders write no name
    os.close(fd)
    return (f'--workdir={workdir} is in use by another run ({holder}); wait for it to end '
            f'or give this run another --workdir')
  if shared:  # the other workers may hold it too: the file names no one
    _held[path] = fd
    return ''
  previous = _holder(fd)
  if previous:
    print(f'{workdir}: taking over the lock of a run that ended without releasing it '
          f'({previous}).', flush=True)
  me = {'host': socket.gethostname(), 'pid': os.getpid(),
        'started': datetime.datetime.now().isoformat(timespec='seconds')}
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(me).encode(), 0)
  _held[path] = fd
  return ''


def _holder(fd: int) -> str:
  text = os.pread(fd, 4096, 0).decode('utf-8', 'replace').strip()
  try:
    who = json.loads(text)
    return f'host {who["host"]}, pid {who["pid"]}, started {who["started"]}'
  except (ValueError, KeyError, TypeError):
    return text[:100]


def release(workdir: str) -> None:
  """Gives up this process's lock on `workdir`, if it holds it: a sweep worker's on a trial
  that has ended, so that the trial's command can run there while the worker goes on."""
  fd = _held.pop(os.path.realpath(os.path.join(workdir, LOCK)), None)
  if fd is not None:
    os.ftruncate(fd, 0)
    os.close(fd)


@atexit.register
def _release_all() -> None:
  """Empties and unlocks the lock files at a normal exit (a killed process leaves its
  holder's name, which the next run reports as taken over)."""
  for fd in _held.values():
    os.ftruncate(fd, 0)
    os.close(fd)
  _held.clear()


def _check_compatible(workdir: str, new: dict) -> list[str]:
  """The fields `new` changes against the workdir's config; raises if the workdir holds
  training that they would mix with another experiment."""
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    return []
  try:
    with open(path, encoding='utf-8') as f:
      old = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not valid JSON ({e}); it is the record of the run in this '
                     f'workdir: restore it, or give this run another --workdir') from None
  if not isinstance(old, dict):
    raise ValueError(f'{path}: not a config (a JSON {type(old).__name__}, not an object); it '
                     f'is the record of the run in this workdir: restore it, or give this run '
                     f'another --workdir')
  changed = sorted(_differences(old, new))
  if not _has_trained(workdir):
    return changed  # nothing trained yet: nothing a new config could corrupt
  if old.get('stage') != new.get('stage'):
    raise ValueError(f'--workdir={workdir} holds a run of stage {old.get("stage")!r}, not '
                     f'{new.get("stage")!r}; give this run another --workdir')
  # A field the recorded config lacks was added to the code after the run started; new
  # fields default to the behaviour the code had before them, so they are no clash.
  clashes = [f for f in changed if not f.startswith(COMPATIBLE) and _has_field(old, f)]
  if clashes:
    shown = ', '.join(clashes[:6]) + (f' and {len(clashes) - 6} more' if len(clashes) > 6 else '')
    raise ValueError(f'--workdir={workdir} holds a run whose config differs in {shown}: '
                     f'resuming it would mix two experiments; rerun with its values '
                     f'({CONFIG}) or give this run another --workdir')
  return changed


def _has_trained(workdir: str) -> bool:
  """Whether the workdir holds a checkpoint, a finished run's files or a sweep's trials."""
  checkpoints = os.path.join(workdir, 'checkpoints')
  saved = os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints))
  return (saved or os.path.isdir(os.path.join(workdir, _SWEEP_TRIALS))
          or any(os.path.exists(os.path.join(workdir, name)) for name in _FINISHED))


def _has_field(tree: dict, path: str) -> bool:
  node = tree
  for key in path.split('.'):
    if not isinstance(node, dict) or key not in node:
      return False
    node = node[key]
  return True


def _differences(old, new, prefix: str = '') -> list[str]:
  """Dotted paths of the fields that differ between two JSON trees."""
  if isinstance(old, dict) and isinstance(new, dict):
    return [path for key in sorted(set(old) | set(new))
            for path in _differences(old.get(key), new.get(key), f'{prefix}{key}.')]
  return [] if old == new else [prefix.rstrip('.')]


def _record(workdir: str, config: dict, changed: list[str]) -> None:
  """Appends the accepted config to the history and makes it the workdir's config.json."""
  entry = {'time': datetime.datetime.now().isoformat(timespec='seconds'), 'changed': changed,
           'config': config}
  with open(os.path.join(workdir, HISTORY), 'a', encoding='utf-8') as f:
    f.write(json.dumps(entry) + '\n')
  path = os.path.join(workdir, CONFIG)
  tmp = f'{path}.{os.getpid()}.tmp'  # its own: a sweep's workers record at the same time
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2, sort_keys=True)
  os.replace(tmp, path)

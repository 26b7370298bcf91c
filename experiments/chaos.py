"""Chaos: main.py SIGKILLed at random moments and resumed, compared bit for bit with a run that
was never interrupted.

  python experiments/chaos.py --kills=50
  python experiments/chaos.py --kills=3 --stages=pretrain,finetune
  python experiments/chaos.py --kills=1 --stages=distill --seed=1234    # replays trial 1234

For each stage (pretrain; finetune, distill and qat on a 2-layer stand-in for MiniLM, as in the
tests) one reference run is left alone; it also records when it committed each checkpoint.
Then each of `--kills` trials runs the same command in a fresh workdir, SIGKILLs it after a
random one of the checkpoints still to come, within the time the reference took from that
checkpoint to the next (so the kill lands inside a step, an asynchronous save, an evaluation,
the test scoring or the report, of any sub-run), reruns it and kills it again, up to
`--max_kills` times, and finally lets a rerun finish. A trial survives if that rerun exits 0,
every rerun after a kill says it took over the dead run's lock, no Orbax temporary directory
is left, and every sub-run's final state, progress record (data position, checksums, early
stopping), summary, evaluation records, report figures (timings aside) and written
safetensors equal the reference's, bit for bit.

Trial i uses seed `--seed` + i, printed with what it did; the table at the end gives the seed
of every failure, and `--kills=1 --seed=<it>` (with the same `--max_kills`) replays its
schedule: the same draws; the moments follow checkpoints, so not the same instructions.
tests/test_chaos.py runs one trial per stage through the functions below on every test run
(`--max_kills=1 --seed=<its LLMOPT_TEST_KILL_SEED>` replays one here).
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The stand-in MiniLM and `restore_state` are the test suite's; importing conftest also gives
# this process, and the runs it starts, the suite's environment: eight simulated CPU devices
# and one JAX compilation cache for every run.
sys.path[:0] = [p for p in (REPO, os.path.join(REPO, 'tests')) if p not in sys.path]

import jax  # noqa: E402  (after the path fix above)
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from conftest import restore_state, tiny_bert  # noqa: E402

TIMEOUT_S = 600   # per main.py process; only stops a hung run
POLL_S = 0.02
ORBAX_TMP = 'orbax-checkpoint-tmp'
TAKEOVER = 'taking over the lock'
# What the loop logs when a run finds a checkpoint (train/loop.py); a run that started over
# from step 0 logs neither.
RESUMED = ('Resumed from', 'Nothing to do')
# Report fields that measure the machine rather than the model.
_TIMING = re.compile(r'latency|time|_per_s$')


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  args: tuple[str, ...]  # main.py's arguments, less --workdir
  runs: tuple[str, ...]  # sub-directories holding a trained run ('' = the workdir itself)


def stages(model: str, source: str) -> dict[str, Stage]:
  """Every stage at test size, with a checkpoint every step and an evaluation every few, so
  that a random moment often falls in a save or an evaluation. `model` is a Hugging Face
  directory standing in for MiniLM; `source` a finished finetune workdir (QAT's start)."""
  every_step = ('--config.checkpoint.every_steps=1',)
  bert = (f'--config.init.model={model}',)
  return {
      # On 8 devices with parameters and optimizer state split 4 x 2 (FSDP x tensor parallel).
      'pretrain': Stage('pretrain', (
          '--config=configs/pretrain.py:tiny,mesh=fsdp_tensor', '--config.train.num_steps=40',
          '--config.train.eval_every=10', '--config.train.log_every=5', *every_step), ('',)),
      'finetune': Stage('finetune', (
          '--config=configs/finetune.py:tiny', *bert, '--config.train.num_steps=6',
          '--config.train.eval_every=3', '--config.export=False', '--config.test_batches=2',
          *every_step), ('',)),
      # The teacher is trained inside the workdir first, then both students (the second,
      # few-shot pair resumes through the same loop; tests/test_distill.py runs it).
      'distill': Stage('distill', (
          '--config=configs/distill.py:tiny', *bert, '--config.train.num_steps=4',
          '--config.few_shot_pair.shots_per_class=0',
          '--config.train.eval_every=2', *every_step,
          f'--config.teacher.config.init.model={model}',
          '--config.teacher.config.train.num_steps=4',
          '--config.teacher.config.train.eval_every=2',
          '--config.teacher.config.checkpoint.every_steps=1'),
          ('teacher', 'student_labels', 'student_kd')),
      'qat': Stage('qat', (
          '--config=configs/qat.py:tiny', *bert, f'--config.source.config.init.model={model}',
          f'--config.source.workdir={source}', '--config.train.num_steps=4',
          '--config.train.eval_every=2', *every_step), ('qat-int4-g128',)),
  }


NAMES = ('pretrain', 'finetune', 'distill', 'qat')

_KILLS = flags.DEFINE_integer('kills', 50, 'Trials per stage, each SIGKILLed at least once.',
                              lower_bound=1)
_STAGES = flags.DEFINE_list('stages', list(NAMES), f'Stages to try, from {",".join(NAMES)}.')
_MAX_KILLS = flags.DEFINE_integer('max_kills', 3, 'Most SIGKILLs in one trial (drawn from 1 '
                                  'to this).', lower_bound=1)
_SEED = flags.DEFINE_integer('seed', None, 'Seed of the first trial (trial i: seed + i); '
                             'default random.')
_WORKDIR = flags.DEFINE_string('workdir', '', 'Where the runs go (kept); default a temporary '
                               'directory, removed unless a trial fails.')
_TFDS_DATA_DIR = flags.DEFINE_string('tfds_data_dir', '', 'TFDS data dir; default '
                                     '$TFDS_DATA_DIR, else one beside the runs.')


# ---- Running main.py --------------------------------------------------------------------------

def environment(tfds_dir: str) -> dict[str, str]:
  """The environment of every main.py this script starts: this process's (conftest's devices
  and compilation cache), one TFDS data dir, and main.py's one-line errors."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TFDS_DATA_DIR=tfds_dir)
  env.pop('LLMOPT_TRACEBACK', None)
  return env


def committed(workdir) -> set[str]:
  """The committed checkpoint steps of the workdir and of its sub-runs, as paths."""
  pattern = os.path.join(str(workdir), '**', 'checkpoints', '*')
  return {p for p in glob.glob(pattern, recursive=True) if os.path.basename(p).isdigit()}


@dataclasses.dataclass(frozen=True)
class Run:
  returncode: int | None  # None: SIGKILLed
  seconds: float          # from start to exit
  commits: tuple[tuple[float, str], ...]  # (seconds from start, path) of each new checkpoint
  log: str                # stdout and stderr


def run(env: dict[str, str], args, workdir, log_path,
        kill_at: tuple[int, float] | None = None) -> Run:
  """Runs main.py on `workdir`. With `kill_at` = (k, s), SIGKILLs it s seconds after the k-th
  checkpoint it commits (of any sub-run), unless it ends first. The child never outlives
  this call."""
  seen = committed(workdir)
  commits = []
  start = time.monotonic()
  with open(log_path, 'w', encoding='utf-8') as log:
    proc = subprocess.Popen([sys.executable, 'main.py', *args, f'--workdir={workdir}'],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
      while proc.poll() is None:
        now = time.monotonic() - start
        new = committed(workdir) - seen
        commits += [(now, path) for path in sorted(new)]
        seen |= new
        k, delay = kill_at or (0, 0.0)
        if k and len(commits) >= k and now >= commits[k - 1][0] + delay:
          proc.send_signal(signal.SIGKILL)
          proc.wait()
          break
        if now > TIMEOUT_S:
          raise TimeoutError(f'main.py on {workdir} still running after {TIMEOUT_S} s')
        time.sleep(POLL_S)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  with open(log_path, encoding='utf-8') as f:
    text = f.read()
  killed = proc.returncode == -signal.SIGKILL
  return Run(None if killed else proc.returncode, time.monotonic() - start, tuple(commits),
             text)


@dataclasses.dataclass(frozen=True)
class Reference:
  stage: Stage
  workdir: str
  # Per checkpoint it committed, in order: seconds until the next one (or until it exited),
  # the window after that checkpoint in which a kill may land.
  gaps: tuple[float, ...]


def reference(env: dict[str, str], stage: Stage, workdir: str) -> Reference:
  """The stage run once without interruption."""
  done = run(env, stage.args, workdir, f'{workdir}.log')
  if done.returncode != 0 or not done.commits:
    raise RuntimeError(f'reference run of {stage.name} failed (exit {done.returncode}):\n'
                       + done.log[-3000:])
  times = [t for t, _ in done.commits] + [done.seconds]
  return Reference(stage, str(workdir), tuple(b - a for a, b in itertools.pairwise(times)))


@dataclasses.dataclass(frozen=True)
class Trial:
  seed: int
  kills: tuple[str, ...]    # each SIGKILL sent: when, after which checkpoint
  finished_first: bool      # a run ended before the kill meant for it
  problems: tuple[str, ...]  # empty: survived, bitwise equal

  def describe(self) -> str:
    kills = '; '.join(self.kills) or 'no SIGKILL'
    ended = ' (a run finished before its kill)' if self.finished_first else ''
    outcome = 'bitwise equal' if not self.problems else 'FAILED: ' + '; '.join(self.problems)
    return f'seed {self.seed}: {kills}{ended}: {outcome}'


def trial(env: dict[str, str], ref: Reference, workdir, seed: int, max_kills: int) -> Trial:
  """Runs the reference's command in `workdir` (fresh), SIGKILLs it 1 to `max_kills` times
  (each rerun anew), lets the last rerun finish, and compares what it wrote with the
  reference. A kill lands after a random one of the checkpoints still to come, within the
  time the reference took from that checkpoint to its next (or to its exit): inside steps,
  saves, evaluations, test scoring, reports. Everything random comes from `seed`."""
  rng = random.Random(seed)
  draws = [(rng.random(), rng.random()) for _ in range(rng.randint(1, max_kills))]
  workdir = str(workdir)
  kills, problems, finished_first, done_commits = [], [], False, set()
  held = False  # whether the last run died holding the workdir's lock
  for i, (which, when) in enumerate(draws):
    to_come = len(ref.gaps) - len(done_commits)
    if to_come < 1:
      break
    k = 1 + int(which * to_come)
    delay = when * ref.gaps[len(ref.gaps) - to_come + k - 1]
    done = run(env, ref.stage.args, workdir, f'{workdir}.{i}.log', kill_at=(k, delay))
    done_commits |= {path for _, path in done.commits}
    if held and TAKEOVER not in done.log:
      problems.append(f'run {i} after a SIGKILL did not say it took over the lock')
    if done.returncode is not None:
      finished_first, held = True, False
      if done.returncode != 0:
        problems.append(f'run {i} failed (exit {done.returncode}): {_tail(done.log)}')
      break
    # A kill in the interpreter's exit, after the lock was released, leaves nothing to take over.
    held = os.path.getsize(os.path.join(workdir, 'lock')) > 0
    anchor, newest = (os.path.relpath(done.commits[j][1], workdir) for j in (k - 1, -1))
    kills.append(f'SIGKILL {delay:.2f} s after {anchor}'
                 + (f' (by then {newest})' if newest != anchor else ''))
  if not problems:
    last = run(env, ref.stage.args, workdir, f'{workdir}.last.log')
    if held and TAKEOVER not in last.log:
      problems.append('the rerun after a SIGKILL did not say it took over the lock')
    if last.returncode != 0:
      problems.append(f'the last rerun failed (exit {last.returncode}): {_tail(last.log)}')
    elif done_commits and not any(word in last.log for word in RESUMED):
      problems.append('the last rerun started over instead of resuming from a checkpoint')
    else:
      problems += differences(ref.workdir, workdir, ref.stage)
  return Trial(seed, tuple(kills), finished_first, tuple(problems))


def _tail(log: str) -> str:
  return ' | '.join(line for line in log.strip().splitlines()[-3:])


# ---- Comparing two workdirs -------------------------------------------------------------------

def differences(want: str, got: str, stage: Stage) -> list[str]:
  """What `got` holds differently from `want` (the same stage's command run elsewhere): the
  final state of each sub-run, bit for bit, its progress record, summary and evaluation
  records, every report.json (timings aside) and every safetensors file; and any Orbax
  temporary directory left in `got`. Empty when they agree."""
  want, got = str(want), str(got)
  found = []
  for sub in stage.runs:
    a, b, name = os.path.join(want, sub), os.path.join(got, sub), sub or '.'
    summary = read_json(os.path.join(a, 'summary.json'))
    other = _read_or_none(os.path.join(b, 'summary.json'))
    if _portable(other, got) != _portable(summary, want):
      found.append(f'{name}/summary.json differs: {_portable(other, got)} != '
                   f'{_portable(summary, want)}')
    step = summary['final_step']
    if not os.path.isdir(os.path.join(b, 'checkpoints', str(step))):
      found.append(f'{name}/checkpoints/{step} is missing')
      continue
    found += [f'{name} step {step}: {d}'
              for d in state_differences(restore_state(a, step), restore_state(b, step))]
    if _progress(b, step) != _progress(a, step):
      found.append(f'{name}/checkpoints/{step}: progress record differs')
    if eval_records(b) != eval_records(a):
      found.append(f'{name}/metrics.jsonl: evaluation records differ')
    if train_log_steps(b) != train_log_steps(a):  # redone steps replace their records
      found.append(f'{name}/metrics.jsonl: training records at other steps')
  for name in _files(want, 'report.json'):
    a = _portable(read_json(os.path.join(want, name)), want)
    b = _portable(_read_or_none(os.path.join(got, name)), got) or {}
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if keys:
      found.append(f'{name}: figures differ in {", ".join(keys)}')
  tensors, other = _files(want, '*.safetensors'), _files(got, '*.safetensors')
  if other != tensors:
    found.append(f'safetensors files {other} != {tensors}')
  found += [f'{name}: bytes differ' for name in sorted(set(tensors) & set(other))
            if _bytes(want, name) != _bytes(got, name)]
  leftovers = glob.glob(os.path.join(got, '**', f'*{ORBAX_TMP}*'), recursive=True)
  if leftovers:
    found.append(f'Orbax temporary directories left: {leftovers}')
  return found


def state_differences(want: Any, got: Any) -> list[str]:
  """Leaves of two restored states that differ in structure, dtype, shape or any bit."""
  if jax.tree.structure(want) != jax.tree.structure(got):
    return [f'tree structure {jax.tree.structure(got)} != {jax.tree.structure(want)}']
  found = []
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
      found.append(f'state{jax.tree_util.keystr(path)} differs')
  return found


def eval_records(run_dir) -> list[dict]:
  path = os.path.join(str(run_dir), 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  return [r for r in records if any(k.startswith('eval/') for k in r)]


def train_log_steps(run_dir) -> list[int]:
  path = os.path.join(str(run_dir), 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [r['step'] for r in map(json.loads, f) if 'train/loss' in r]


def read_json(path) -> Any:
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _read_or_none(path) -> Any:
  return read_json(path) if os.path.exists(path) else None


def _progress(run_dir: str, step: int) -> Any:
  # Orbax keeps a JsonSave item as one JSON file: <step>/<item>/metadata.
  return _read_or_none(os.path.join(run_dir, 'checkpoints', str(step), 'progress', 'metadata'))


def _portable(value: Any, workdir: str) -> Any:
  """`value` with timings dropped and paths made relative to `workdir`."""
  if isinstance(value, dict):
    return {k: _portable(v, workdir) for k, v in value.items() if not _TIMING.search(k)}
  if isinstance(value, list):
    return [_portable(v, workdir) for v in value]
  if isinstance(value, str) and value.startswith(workdir):
    return '<workdir>' + value[len(workdir):]
  return value


def _files(root: str, pattern: str) -> list[str]:
  return sorted(os.path.relpath(p, root)
                for p in glob.glob(os.path.join(root, '**', pattern), recursive=True))


def _bytes(root: str, name: str) -> bytes:
  with open(os.path.join(root, name), 'rb') as f:
    return f.read()


# ---- The long version -------------------------------------------------------------------------

def main(argv) -> None:
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every read at INFO
  names = _STAGES.value
  unknown = sorted(set(names) - set(NAMES))
  if unknown:
    raise app.UsageError(f'--stages: unknown {unknown}; choose from {list(NAMES)}')
  seed = _SEED.value
  if seed is None:
    seed = random.SystemRandom().randrange(2**31)
  root = _WORKDIR.value or tempfile.mkdtemp(prefix='chaos_')
  os.makedirs(root, exist_ok=True)
  env = environment(_TFDS_DATA_DIR.value or os.environ.get('TFDS_DATA_DIR')
                    or os.path.join(root, 'tfds'))
  print(f'chaos: stages {",".join(names)}, {_KILLS.value} trials each, up to '
        f'{_MAX_KILLS.value} SIGKILLs per trial, seeds {seed}..'
        f'{seed + _KILLS.value - 1}; workdirs under {root}', flush=True)

  model = tiny_bert(os.path.join(root, 'tiny_bert'))
  # QAT starts from a finished fine-tune: the finetune reference, made for it if need be.
  needed = [n for n in NAMES if n in names or (n == 'finetune' and 'qat' in names)]
  refs: dict[str, Reference] = {}
  rows = []
  for name in needed:
    source = refs['finetune'].workdir if 'finetune' in refs else ''
    stage = stages(model, source)[name]
    start = time.monotonic()
    refs[name] = reference(env, stage, os.path.join(root, f'{name}-reference'))
    print(f'{name}: reference run in {time.monotonic() - start:.0f} s, '
          f'{len(refs[name].gaps)} checkpoints', flush=True)
    if name not in names:
      continue
    trials = []
    for i in range(_KILLS.value):
      workdir = os.path.join(root, f'{name}-{seed + i}')
      done = trial(env, refs[name], workdir, seed + i, _MAX_KILLS.value)
      trials.append(done)
      print(f'{name} {done.describe()}', flush=True)
      if not done.problems:
        _remove(workdir)
    rows.append((name, trials))

  print('\n| stage | trials | SIGKILLs sent | runs that ended before a kill | survived, bitwise '
        'equal | failures (seed) |\n| --- | --- | --- | --- | --- | --- |')
  for name, trials in rows:
    failed = [str(t.seed) for t in trials if t.problems]
    print(f'| {name} | {len(trials)} | {sum(len(t.kills) for t in trials)} | '
          f'{sum(t.finished_first for t in trials)} | {len(trials) - len(failed)} | '
          f'{", ".join(failed) or "none"} |')
  if any(t.problems for _, trials in rows for t in trials):
    print(f'\nFailed trials keep their workdirs and logs under {root}.')
    sys.exit(1)
  if not _WORKDIR.value:
    shutil.rmtree(root, ignore_errors=True)


def _remove(workdir: str) -> None:
  shutil.rmtree(workdir, ignore_errors=True)
  for log in glob.glob(f'{workdir}.*log'):
    os.remove(log)


if __name__ == '__main__':
  app.run(main)

"""Chaos: every stage SIGKILLed at random moments, rerun, and compared bit for bit with a run
that was never interrupted (`experiments/chaos.py`; this is one trial per stage of it).

A kill lands after a random checkpoint, within the time the uninterrupted run took to its next
one: inside a step, an asynchronous save, an evaluation, the test scoring or the report. The
rerun must take over the dead run's lock, leave no Orbax temporary directory, and end with the
reference's final state of every sub-run (the teacher and both students of a distillation),
its progress record, summary, evaluation records, report figures and safetensors files.

The seed is random and printed; LLMOPT_TEST_KILL_SEED=<seed> replays a trial's schedule.
The uninterrupted runs are made once per test session, shared by the xdist workers, and used
by tests/test_workdir.py as well.
"""

import dataclasses
import fcntl
import importlib.util
import json
import os
import random
import shutil
import sys
from collections.abc import Callable
from typing import Any

import pytest
from test_main import cli_env  # noqa: F401  (a fixture)

from conftest import REPO


def _load_chaos():
  """experiments/chaos.py as a module (experiments/ is scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(
      'chaos', os.path.join(REPO, 'experiments', 'chaos.py'))
  module = importlib.util.module_from_spec(spec)
  sys.modules['chaos'] = module  # its dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


chaos = _load_chaos()


def once(shared_dir, name: str, make: Callable[[str], Any]) -> Any:
  """`make(<shared_dir>/<name>)`, run by the first worker that asks; every worker gets its
  result (JSON) without running it again."""
  with open(os.path.join(shared_dir, f'{name}.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    record = os.path.join(shared_dir, f'{name}.json')
    if not os.path.exists(record):
      path = os.path.join(shared_dir, name)
      shutil.rmtree(path, ignore_errors=True)
      result = make(path)
      with open(record, 'w', encoding='utf-8') as f:
        json.dump(result, f)
    return chaos.read_json(record)


@pytest.fixture(scope='session')
def shared_dir(tmp_path_factory) -> str:
  """A directory shared by the xdist workers of this test session (each worker's base
  temporary directory sits in the session's own; without xdist, the session's)."""
  base = tmp_path_factory.getbasetemp()
  return str(base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base)


@pytest.fixture(scope='session')
def references(cli_env, shared_dir) -> Callable[[str], Any]:  # noqa: F811
  """name -> `chaos.Reference`: the stage's run left alone, made once per session. The
  stand-in MiniLM is made once too, so that every run's config names the same directory."""
  def get(name: str):
    model = once(shared_dir, 'tiny_bert', chaos.tiny_bert)
    source = get('finetune').workdir if name == 'qat' else ''
    stage = chaos.stages(model, source)[name]
    made = once(shared_dir, f'{name}-reference',
                lambda path: dataclasses.asdict(chaos.reference(cli_env, stage, path)))
    return chaos.Reference(stage, made['workdir'], tuple(made['gaps']))
  return get


def kill_seed() -> int:
  return int(os.environ.get('LLMOPT_TEST_KILL_SEED', random.SystemRandom().randrange(2**31)))


@pytest.mark.parametrize('name', chaos.NAMES)
def test_sigkill_at_random_moments_then_rerun_ends_bitwise_equal(
    name, references, cli_env, tmp_path):  # noqa: F811
  """Pretrain, finetune, distill (teacher, then students) and QAT, each killed at a random
  moment and rerun, end exactly where their uninterrupted run ends."""
  ref = references(name)
  seed = kill_seed()
  print(f'{name}: kill seed {seed}')
  trial = chaos.trial(cli_env, ref, tmp_path / 'killed', seed, max_kills=1)
  print(trial.describe())
  assert not trial.problems, f'LLMOPT_TEST_KILL_SEED={seed}: {trial.describe()}'

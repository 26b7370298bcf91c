"""The workdir as the record of a run (`llmopt_jax/workdir.py`, checksummed checkpoints,
Ctrl-C), through main.py in a subprocess.

A refused command exits non-zero with one error line naming what to fix and no traceback, and
leaves every file of the workdir byte for byte as it was (the lock aside, which the new process
may rewrite). A run that meets a fault it can recover from (a damaged checkpoint, a second run
on its workdir, Ctrl-C and a rerun) ends bit for bit where the uninterrupted run ends: the
pretrain reference of tests/test_chaos.py, made once per test session.
"""

import os
import re
import shutil
import json
import signal
import socket
import subprocess
import sys
import time

import pytest
from test_chaos import chaos, once, references, shared_dir  # noqa: F401  (fixtures)
from test_main import (TIMEOUT_S, assert_one_line_error, cli_env, error_line,  # noqa: F401
                       explain, main_py, orbax_tmp_dirs, read_jsonl, step_dirs)

from conftest import REPO

# The pretrain command of the reference runs: 40 steps, a checkpoint after each, on a 4 x 2 mesh.
PRETRAIN = chaos.stages(model='', source='')['pretrain']


def finished_copy(ref, tmp_path) -> str:
  """A copy of the finished reference run, for a test to run commands on."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(ref.workdir, workdir)
  return workdir


def snapshot(root) -> dict[str, bytes]:
  """Every file under `root` (relative path -> bytes), except the workdir's lock file."""
  files = {}
  for directory, _, names in os.walk(root):
    for name in names:
      path = os.path.join(directory, name)
      relative = os.path.relpath(path, root)
      if relative != 'lock':
        with open(path, 'rb') as f:
          files[relative] = f.read()
  return files


def changes(before: dict[str, bytes], after: dict[str, bytes]) -> list[str]:
  return ([f'{p} removed' for p in sorted(set(before) - set(after))]
          + [f'{p} added' for p in sorted(set(after) - set(before))]
          + [f'{p} changed' for p in sorted(set(before) & set(after)) if before[p] != after[p]])


def assert_same_as_reference(ref, workdir) -> None:
  found = chaos.differences(ref.workdir, workdir, ref.stage)
  assert not found, '\n'.join(found)


# ---- Refused commands -------------------------------------------------------------------------

def _write(name: str, data: bytes):
  def edit(workdir: str) -> None:
    with open(os.path.join(workdir, name), 'wb') as f:
      f.write(data)
  return edit


def _truncate_config(workdir: str) -> None:
  path = os.path.join(workdir, 'config.json')
  os.truncate(path, os.path.getsize(path) // 2)


def _lock_is_a_directory(workdir: str) -> None:
  os.remove(os.path.join(workdir, 'lock'))
  os.mkdir(os.path.join(workdir, 'lock'))


def _no_edit(workdir: str) -> None:
  del workdir


# id: (what is done to the finished workdir first, arguments ('{model}': the stand-in MiniLM;
# None: the reference's command), extra overrides, what the error line must name ('{workdir}'
# is the workdir)).
REFUSED = [
    pytest.param(_no_edit, ['--config=configs/finetune.py:tiny', '--config.init.model={model}'],
                 ["'pretrain'", "'finetune'", '{workdir}'], id='another_stage'),
    pytest.param(_no_edit, ['--config.model.num_layers=3'], ['model.num_layers', '{workdir}'],
                 id='model_changed'),
    pytest.param(_no_edit, ['--config.optim.lr=0.01'], ['optim.lr', '{workdir}'],
                 id='lr_changed'),
    pytest.param(_no_edit, ['--config.seed=1'], ['seed', '{workdir}'], id='seed_changed'),
    pytest.param(_no_edit, ['--config.train.num_steps=0'], ['train.num_steps'],
                 id='num_steps_0'),
    pytest.param(_no_edit, ['--config.optim.lr=-1'], ['optim.lr'], id='lr_negative'),
    pytest.param(_no_edit, ['--config.optim.lr=nan'], ['optim.lr'], id='lr_nan'),
    pytest.param(_no_edit, ['--config.train.eval_every=0'], ['train.eval_every'],
                 id='eval_every_0'),
    pytest.param(_no_edit, ['--config.checkpoint.every_steps=0'], ['checkpoint.every_steps'],
                 id='checkpoint_every_steps_0'),
    pytest.param(_truncate_config, [], ['{workdir}/config.json'], id='config_json_cut_short'),
    pytest.param(_write('config.json', b'\xff\xfe{"stage": "pretrain"}'), [],
                 ['{workdir}/config.json'], id='config_json_not_utf8'),
    pytest.param(_write('config.json', b'[]'), [], ['{workdir}/config.json'],
                 id='config_json_a_list'),
    pytest.param(_write('config.json', b'null'), [], ['{workdir}/config.json'],
                 id='config_json_null'),
    pytest.param(_lock_is_a_directory, [], ['{workdir}/lock'], id='lock_is_a_directory'),
]


@pytest.mark.parametrize('edit, args, names', REFUSED)
def test_a_refused_command_leaves_the_finished_run_as_it_was(
    edit, args, names, references, shared_dir, cli_env, tmp_path):  # noqa: F811
  """Another stage, a change that would mix two experiments, a bad value or a damaged record
  (config.json, the lock) is refused in one line naming the field or the file, and no file of
  the finished run changes: not config.json, not config_history.jsonl, not a checkpoint."""
  ref = references('pretrain')
  workdir = finished_copy(ref, tmp_path)
  edit(workdir)
  before = snapshot(workdir)
  if args and args[0].startswith('--config='):
    model = once(shared_dir, 'tiny_bert', chaos.tiny_bert)
    command = [a.format(model=model) for a in args]
  else:
    command = [*ref.stage.args, *args]
  result = main_py(cli_env, *command, f'--workdir={workdir}')
  assert_one_line_error(result, *[n.format(workdir=workdir) for n in names])
  assert changes(before, snapshot(workdir)) == []


BAD_VALUES = {
    # id: (override, field the error line names)
    'num_steps_0': ('--config.train.num_steps=0', 'train.num_steps'),
    'num_steps_negative': ('--config.train.num_steps=-5', 'train.num_steps'),
    'lr_negative': ('--config.optim.lr=-1', 'optim.lr'),
    'lr_nan': ('--config.optim.lr=nan', 'optim.lr'),
    'eval_every_0': ('--config.train.eval_every=0', 'train.eval_every'),
    'checkpoint_every_steps_0': ('--config.checkpoint.every_steps=0', 'checkpoint.every_steps'),
}


@pytest.mark.parametrize('case', BAD_VALUES)
def test_a_bad_value_in_a_new_workdir_is_refused_before_any_work(
    case, cli_env, tmp_path):  # noqa: F811
  override, field = BAD_VALUES[case]
  workdir = tmp_path / 'run'
  result = main_py(cli_env, *PRETRAIN.args, override, f'--workdir={workdir}')
  assert_one_line_error(result, field)
  assert not (workdir / 'checkpoints').exists(), 'a refused run wrote checkpoints'
  assert not (workdir / 'metrics.jsonl').exists(), 'a refused run started training'


def test_more_steps_for_a_finished_run_resume_it_and_are_recorded(
    references, cli_env, tmp_path):  # noqa: F811
  """A compatible change (the step count) continues the finished run from its last
  checkpoint; config_history.jsonl keeps the first command and adds the second, naming the
  changed field; config.json is the second."""
  ref = references('pretrain')
  workdir = finished_copy(ref, tmp_path)
  first = read_jsonl(os.path.join(workdir, 'config_history.jsonl'))
  result = main_py(cli_env, *ref.stage.args, '--config.train.num_steps=44', f'--workdir={workdir}')
  assert result.returncode == 0, explain(result)
  assert f"Resumed from {workdir}/checkpoints/40." in result.stderr, explain(result)
  history = read_jsonl(os.path.join(workdir, 'config_history.jsonl'))
  assert len(history) == 2 and history[0] == first[0], history
  assert history[1]['changed'] == ['train.num_steps'], history[1]['changed']
  assert history[1]['config']['train']['num_steps'] == 44
  assert chaos.read_json(os.path.join(workdir, 'config.json')) == history[1]['config']
  assert chaos.read_json(os.path.join(workdir, 'summary.json'))['final_step'] == 44


def test_a_resumed_run_keeps_its_best_checkpoint(cli_env, tmp_path):  # noqa: F811
  """Evaluations ranked by the highest loss make the first one (step 4) the best, older than
  the two latest steps; continuing the run (more steps) must keep that checkpoint, which its
  summary names."""
  workdir = tmp_path / 'run'
  command = ['--config=configs/pretrain.py:tiny', '--config.train.eval_every=4',
             '--config.checkpoint.every_steps=1', '--config.early_stopping.mode=max',
             f'--workdir={workdir}']
  first = main_py(cli_env, *command, '--config.train.num_steps=12')
  assert first.returncode == 0, explain(first)
  summary = chaos.read_json(workdir / 'summary.json')
  assert summary['best_step'] == 4 and summary['checkpoint_steps'] == [4, 11, 12], summary

  again = main_py(cli_env, *command, '--config.train.num_steps=14')
  assert again.returncode == 0, explain(again)
  summary = chaos.read_json(workdir / 'summary.json')
  assert summary['best_step'] == 4, summary
  assert os.path.isdir(summary['best_checkpoint']), f'best checkpoint deleted: {summary}'


# ---- A second run on a live workdir -----------------------------------------------------------

def test_a_second_run_on_a_live_workdir_is_refused_and_the_first_is_unharmed(
    references, cli_env, tmp_path):  # noqa: F811
  """While one run holds the workdir, the same command on it fails at once with one line
  naming the holder (host and pid); the first run finishes exactly as a run that was alone."""
  ref = references('pretrain')
  workdir = str(tmp_path / 'run')
  lock = os.path.join(workdir, 'lock')
  with open(tmp_path / 'first.log', 'w', encoding='utf-8') as log:
    first = subprocess.Popen([sys.executable, 'main.py', *ref.stage.args, f'--workdir={workdir}'],
                             cwd=REPO, env=cli_env, stdout=log, stderr=subprocess.STDOUT)
    try:
      while not (os.path.exists(lock) and os.path.getsize(lock)):  # its holder is written
        assert first.poll() is None, (tmp_path / 'first.log').read_text()
        time.sleep(0.02)
      second = main_py(cli_env, *ref.stage.args, f'--workdir={workdir}')
      still_running = first.poll() is None
      first.wait(timeout=TIMEOUT_S)
    finally:
      if first.poll() is None:
        first.kill()
        first.wait()
  assert still_running, 'the first run ended before the second was refused: nothing tested'
  assert_one_line_error(second, workdir, 'in use', f'host {socket.gethostname()}',
                        f'pid {first.pid}')
  assert first.returncode == 0, (tmp_path / 'first.log').read_text()
  assert len(read_jsonl(os.path.join(workdir, 'config_history.jsonl'))) == 1
  assert_same_as_reference(ref, workdir)


# ---- Checkpoints damaged on disk --------------------------------------------------------------

def array_file(step_dir) -> str:
  """The largest data file of the step's state: array bytes (Orbax's OCDBT store)."""
  state = os.path.join(step_dir, 'state')
  files = [os.path.join(d, n) for d, _, names in os.walk(state) for n in names
           if os.sep + 'd' + os.sep in os.path.join(d, n)[len(state):]]
  return max(files, key=os.path.getsize)


def flip_a_bit(step_dir) -> None:
  path = array_file(step_dir)
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x10]))


DAMAGE = {
    'bit_flipped_in_an_array_file': flip_a_bit,
    'array_file_truncated': lambda step_dir: os.truncate(
        array_file(step_dir), os.path.getsize(array_file(step_dir)) // 2),
    'manifest_deleted': lambda step_dir: os.remove(os.path.join(step_dir, 'state',
                                                                'manifest.ocdbt')),
    'metadata_deleted': lambda step_dir: os.remove(os.path.join(step_dir, 'state', '_METADATA')),
}


@pytest.mark.parametrize('damage', DAMAGE)
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
    damage, references, cli_env, tmp_path):  # noqa: F811
  """The finished run's newest checkpoint damaged on disk: the rerun says the step cannot be
  used, moves it to damaged-<step> byte for byte, resumes from the step before, redoes the
  last step and ends exactly where the uninterrupted run ended."""
  ref = references('pretrain')
  workdir = finished_copy(ref, tmp_path)
  checkpoints = os.path.join(workdir, 'checkpoints')
  *_, previous, newest = step_dirs(checkpoints)
  DAMAGE[damage](os.path.join(checkpoints, str(newest)))
  damaged = snapshot(os.path.join(checkpoints, str(newest)))

  result = main_py(cli_env, *ref.stage.args, f'--workdir={workdir}')
  assert result.returncode == 0, explain(result)
  said = re.findall(r'^checkpoint (\S+) cannot be used \(.*\); moved to (\S+)$', result.stderr,
                    re.MULTILINE)
  assert said == [(f'{checkpoints}/{newest}', f'{checkpoints}/damaged-{newest}')], explain(result)
  assert f'Resumed from {checkpoints}/{previous}.' in result.stderr, explain(result)
  assert snapshot(os.path.join(checkpoints, f'damaged-{newest}')) == damaged
  assert_same_as_reference(ref, workdir)


def test_when_every_checkpoint_is_damaged_the_run_fails_in_one_line_and_keeps_them(
    references, cli_env, tmp_path):  # noqa: F811
  """Every checkpoint damaged: one error line naming each step, every step kept byte for byte
  as damaged-<step>; the rerun it suggests starts afresh and ends where the reference ends."""
  ref = references('pretrain')
  workdir = finished_copy(ref, tmp_path)
  checkpoints = os.path.join(workdir, 'checkpoints')
  steps = step_dirs(checkpoints)
  for step in steps:
    flip_a_bit(os.path.join(checkpoints, str(step)))
  before = snapshot(checkpoints)

  result = main_py(cli_env, *ref.stage.args, f'--workdir={workdir}')
  assert_one_line_error(result, checkpoints, 'rerun',
                        *[f'{checkpoints}/{step} cannot be used' for step in steps])
  assert snapshot(checkpoints) == {re.sub(r'^(\d+)/', r'damaged-\1/', p): data
                                   for p, data in before.items()}

  again = main_py(cli_env, *ref.stage.args, f'--workdir={workdir}')
  assert again.returncode == 0, explain(again)
  assert 'Resumed from' not in again.stderr, explain(again)
  assert_same_as_reference(ref, workdir)


# ---- A run that ended between its last checkpoint and its summary -----------------------------

def test_a_run_killed_before_its_summary_reruns_to_the_same_summary(
    references, cli_env, tmp_path):  # noqa: F811
  ref = references('pretrain')
  workdir = finished_copy(ref, tmp_path)
  # As a SIGKILL after the last save leaves it: no summary, and a step the policy (keep the
  # last two) drops after that save still on disk.
  os.remove(os.path.join(workdir, 'summary.json'))
  checkpoints = os.path.join(workdir, 'checkpoints')
  newest = max(step_dirs(checkpoints))
  shutil.copytree(os.path.join(checkpoints, str(newest - 1)),
                  os.path.join(checkpoints, str(newest - 2)))
  result = main_py(cli_env, *ref.stage.args, f'--workdir={workdir}')
  assert result.returncode == 0, explain(result)
  assert_same_as_reference(ref, workdir)


def test_a_malformed_summary_json_is_named_or_rewritten(
    references, cli_env, tmp_path):  # noqa: F811
  """summary.json of a finished run cut short: the rerun either rebuilds it or refuses in one
  line naming it."""
  ref = references('pretrain')
  workdir = finished_copy(ref, tmp_path)
  summary = os.path.join(workdir, 'summary.json')
  with open(summary, 'w', encoding='utf-8') as f:
    f.write('{"final_step": ')
  result = main_py(cli_env, *ref.stage.args, f'--workdir={workdir}')
  if result.returncode == 0:
    assert_same_as_reference(ref, workdir)
  else:
    assert_one_line_error(result, summary)


# ---- Ctrl-C -----------------------------------------------------------------------------------

def test_ctrl_c_stops_in_one_line_with_exit_130_and_the_rerun_finishes(
    references, cli_env, tmp_path):  # noqa: F811
  """SIGINT after the first checkpoint: exit 130 and one line saying at which step it stopped
  and which checkpoint a rerun starts from; the rerun resumes there and ends where the
  uninterrupted run ends."""
  ref = references('pretrain')
  workdir = str(tmp_path / 'run')
  checkpoints = os.path.join(workdir, 'checkpoints')
  stderr_path = tmp_path / 'stderr.log'
  with open(stderr_path, 'w', encoding='utf-8') as stderr:
    # Only an ignored signal survives exec: if this process ignores SIGINT (a background CI
    # shell), main.py would too. Any handler here gives the child SIGINT's default action.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
      proc = subprocess.Popen([sys.executable, 'main.py', *ref.stage.args, f'--workdir={workdir}'],
                              cwd=REPO, env=cli_env, stdout=subprocess.DEVNULL, stderr=stderr)
    finally:
      signal.signal(signal.SIGINT, previous)
    try:
      while not step_dirs(checkpoints):
        assert proc.poll() is None, stderr_path.read_text()
        time.sleep(0.02)
      proc.send_signal(signal.SIGINT)
      proc.wait(timeout=TIMEOUT_S)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  text = stderr_path.read_text()
  assert proc.returncode == 130, text
  assert 'Traceback' not in text, text
  stopped = re.fullmatch(r'error: interrupted at step (\d+); the last checkpoint is step (\d+) '
                         r'in (\S+); rerun the same command to resume', error_line(text))
  assert stopped, text
  step, last = int(stopped.group(1)), int(stopped.group(2))
  assert stopped.group(3) == checkpoints and last == step_dirs(checkpoints)[-1] <= step < 40
  assert orbax_tmp_dirs(checkpoints) == []

  again = main_py(cli_env, *ref.stage.args, f'--workdir={workdir}')
  assert again.returncode == 0, explain(again)
  assert f'Resumed from {checkpoints}/{last}.' in again.stderr, explain(again)
  assert_same_as_reference(ref, workdir)


def test_a_field_added_to_the_code_since_the_run_is_no_clash(tmp_path):
  """A finished run's config.json lacks a field the code added later (a new section, say):
  resuming with it is accepted and recorded; changing a field the run had is refused."""
  import ml_collections
  from llmopt_jax import workdir as workdir_lib
  old = ml_collections.ConfigDict({'stage': 'finetune', 'optim': {'lr': 1e-4}})
  workdir_lib.prepare(str(tmp_path), old)
  workdir_lib.release(str(tmp_path))
  (tmp_path / 'summary.json').write_text('{}')  # the run has finished
  newer = ml_collections.ConfigDict({'stage': 'finetune', 'optim': {'lr': 1e-4},
                                     'consistency': {'weight': 0.0, 'temperature': 0.4}})
  workdir_lib.prepare(str(tmp_path), newer)
  workdir_lib.release(str(tmp_path))
  history = (tmp_path / 'config_history.jsonl').read_text().splitlines()
  assert json.loads(history[-1])['changed'] == ['consistency']
  changed = ml_collections.ConfigDict(newer.to_dict())
  changed.optim.lr = 3e-4
  with pytest.raises(ValueError, match='differs in optim.lr'):
    workdir_lib.prepare(str(tmp_path), changed)

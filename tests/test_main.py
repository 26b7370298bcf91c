"""main.py end to end, through the real command line in a subprocess.

Properties: bad input fails with one line that names what to fix, a non-zero exit and no
traceback; every config under configs/ runs at `tiny`; rerunning a finished run does nothing;
a second run finds its compiled programs in the default cache. A run SIGKILLed at random
moments and rerun is tests/test_chaos.py's (every stage, compared bit for bit).

Subprocesses share one TFDS data dir (the shipped corpus is prepared once) and one JAX
compilation cache (the tiny model is compiled once per set of shapes, not once per run).
"""

import glob
import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import REPO

# Per subprocess. A tiny run takes seconds plus compilation; this only stops a hung run.
TIMEOUT_S = 300
ABSL_USAGE_HINT = 'Pass --helpshort or --helpfull'
ORBAX_TMP = 'orbax-checkpoint-tmp'
TINY = '--config=configs/pretrain.py:tiny'


@pytest.fixture(scope='session')
def cli_env(tfds_dir) -> dict[str, str]:
  """The environment of every main.py subprocess."""
  env = dict(os.environ)  # keeps conftest's eight simulated devices: the CLI runs sharded
  env.pop('LLMOPT_TRACEBACK', None)  # errors must take main.py's one-line path
  env.update(
      JAX_PLATFORMS='cpu',
      TFDS_DATA_DIR=tfds_dir,  # the configs leave config.data.tfds_data_dir = ''
  )
  return env


def main_py(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
  """Runs `python main.py *args` in the repository; `subprocess.run` kills it on timeout."""
  return subprocess.run([sys.executable, 'main.py', *args], check=False, cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def explain(result: subprocess.CompletedProcess) -> str:
  return (f'exit {result.returncode}\n--- stdout ---\n{result.stdout}'
          f'\n--- stderr ---\n{result.stderr}')


def error_line(stderr: str) -> str:
  """The last non-empty line of stderr, skipping absl's usage hint after a flag error."""
  lines = [line.strip() for line in stderr.splitlines()
           if line.strip() and not line.startswith(ABSL_USAGE_HINT)]
  return lines[-1] if lines else ''


def assert_one_line_error(result: subprocess.CompletedProcess, *names: str) -> str:
  """Non-zero exit, no traceback, and a final error line that contains every one of `names`."""
  assert result.returncode != 0, explain(result)
  assert 'Traceback' not in result.stderr, explain(result)
  line = error_line(result.stderr)
  assert 'error' in line.lower(), f'last stderr line {line!r} is no error\n{explain(result)}'
  missing = [name for name in names if name not in line]
  assert not missing, f'error line {line!r} does not name {missing}\n{explain(result)}'
  return line


def read_json(path) -> dict:
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def read_jsonl(path) -> list[dict]:
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def step_dirs(checkpoint_dir) -> list[int]:
  """Steps whose checkpoint Orbax has committed (renamed from its temporary name)."""
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(int(name) for name in os.listdir(checkpoint_dir) if name.isdigit())


def orbax_tmp_dirs(checkpoint_dir) -> list[str]:
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(name for name in os.listdir(checkpoint_dir) if ORBAX_TMP in name)


# ---- Bad input --------------------------------------------------------------------------------

BAD_INPUT = {
    # id: (arguments before --workdir, what the error line must name)
    'missing_config_file': (['--config=configs/no_such_config.py'],
                            ['configs/no_such_config.py']),
    'unknown_model_preset': (['--config=configs/pretrain.py:model=huge'], ['huge', 'small']),
    # `tiny` shrinks everything else but honours (and checks) an explicit model or tokenizer.
    'unknown_model_preset_at_tiny': (['--config=configs/pretrain.py:tiny,model=huge'],
                                     ['huge', 'small']),
    'unknown_tokenizer_at_tiny': ([TINY + ',tokenizer=wordpiece'],
                                  ['config.data.tokenizer', 'wordpiece']),
    'unknown_config_argument': (['--config=configs/pretrain.py:tiniest'], ['tiniest', 'tiny']),
    'override_of_wrong_type': ([TINY, '--config.optim.lr=abc'], ['config.optim.lr', 'abc']),
    'unknown_override_field': ([TINY, '--config.optim.lrr=1e-3'], ['optim.lrr']),
    'unknown_dataset': ([TINY, '--config.data.name=no_such_set'], ['no_such_set']),
    'unknown_split': ([TINY, '--config.data.eval_split=test'], ['split', 'test', 'validation']),
    'unknown_stage': ([TINY, '--config.stage=nope'], ['nope', 'pretrain']),
    'unknown_schedule': ([TINY, '--config.optim.schedule=exp'], ['schedule', 'exp', 'cosine']),
}


@pytest.mark.parametrize('case', list(BAD_INPUT), ids=list(BAD_INPUT))
def test_bad_input_fails_with_one_line_naming_the_problem(case, cli_env, tmp_path):
  """A mistake in the config file, a preset, an argument, an override or a name stops the
  run before any training state is written: a non-zero exit and one error line naming the
  culprit (and, where there is a fixed set, what is allowed), not a traceback."""
  args, names = BAD_INPUT[case]
  workdir = tmp_path / 'run'
  result = main_py(cli_env, *args, f'--workdir={workdir}')
  assert_one_line_error(result, *names)
  assert not (workdir / 'checkpoints').exists(), 'a failed run wrote checkpoints'


def test_workdir_that_is_a_file_is_refused_and_left_alone(cli_env, tmp_path):
  """--workdir naming an existing file fails with the file named, and the file is untouched."""
  path = tmp_path / 'notes.txt'
  content = b'results I must not lose\n'
  path.write_bytes(content)
  result = main_py(cli_env, TINY, f'--workdir={path}')
  assert_one_line_error(result, str(path))
  assert path.read_bytes() == content
  assert sorted(os.listdir(tmp_path)) == ['notes.txt'], 'something was written beside it'


# The `text_file` source: one local file, documents separated by blank lines.

def test_missing_text_file_is_named(cli_env, tmp_path):
  """config.data.path pointing at no file fails with that path in the error line."""
  path = tmp_path / 'no_such_corpus.txt'
  result = main_py(cli_env, TINY, '--config.data.name=text_file', f'--config.data.path={path}',
                   f'--workdir={tmp_path / "run"}')
  assert_one_line_error(result, str(path))


@pytest.mark.parametrize('content', ['', '\n\n   \n\n'], ids=['empty', 'blank_lines_only'])
def test_empty_text_file_is_named_as_an_empty_corpus(content, cli_env, tmp_path):
  """A text file without a single document fails with the file named and the corpus called
  empty, instead of training on nothing or failing later with a shape error."""
  path = tmp_path / 'corpus.txt'
  path.write_text(content, encoding='utf-8')
  result = main_py(cli_env, TINY, '--config.data.name=text_file', f'--config.data.path={path}',
                   f'--workdir={tmp_path / "run"}')
  line = assert_one_line_error(result, str(path))
  assert re.search(r'empty|no (text|documents)', line, re.IGNORECASE), line


# ---- Every config, tiny -----------------------------------------------------------------------

CONFIG_FILES = sorted(glob.glob('configs/*.py', root_dir=REPO))
# Run at `tiny` by their own stage tests, which read their reports in detail (the same
# configs, the same stage code; main.py's dispatch is the one every config shares):
# tests/test_prune_stage.py and tests/test_compress.py. Running them here too would add
# minutes of compilation to the suite for no path that is not already covered.
# tests/test_quant_stages.py runs configs/ptq.py:tiny (its source fine-tune inside) the same
# way, in process, and reads its report and files.
COVERED_ELSEWHERE = ('configs/prune.py', 'configs/compress.py', 'configs/ptq.py',
                     'configs/predict.py')  # needs a trained model: tests/test_predict.py
# configs/serve.py serves until a signal ends it: tests/test_serve.py runs it so.
COVERED_ELSEWHERE += ('configs/serve.py',)
# configs/sweep.py:tiny is a study of 4 fine-tunes, and configs/tune_finetune.py one built on
# it (their fields are config.sweep and config.base, not config.train): tests/test_sweep.py
# runs tiny studies of both end to end.
COVERED_ELSEWHERE += ('configs/sweep.py', 'configs/tune_finetune.py')
# configs/generate.py trains nothing of its own (no train.num_steps): its tiny config runs in
# tests/test_generate_stage.py.
COVERED_ELSEWHERE += ('configs/generate.py',)
# Run through main.py at tiny, to the end, by the references of tests/test_chaos.py (which
# then compares every file they write with a killed and resumed run); the multi-task tiny
# config runs in-process in tests/test_multitask.py. A minute and a half of the suite saved.
COVERED_ELSEWHERE += ('configs/distill.py', 'configs/qat.py', 'configs/multitask.py')


# The configs that start from MiniLM get a 2-layer, 32-wide stand-in with its tokenizer here
# (every model field they read); MiniLM itself is fine-tuned by tests/test_finetune.py.
START_FIELDS = {'finetune': ('init.model',)}


@pytest.mark.parametrize('config_file',
                         [f for f in CONFIG_FILES if f not in COVERED_ELSEWHERE],
                         ids=os.path.basename)
def test_every_config_runs_at_tiny(config_file, cli_env, tiny_bert_dir, tmp_path):
  """Each config's `tiny` argument runs two steps from the command line, writes summary.json
  and says where the results are."""
  workdir = tmp_path / 'run'
  start = [f'--config.{field}={tiny_bert_dir}'
           for field in START_FIELDS.get(os.path.basename(config_file)[:-3], ())]
  result = main_py(cli_env, f'--config={config_file}:tiny', '--config.train.num_steps=2',
                   *start, f'--workdir={workdir}')
  assert result.returncode == 0, explain(result)
  assert read_json(workdir / 'summary.json')['final_step'] == 2
  assert str(workdir) in result.stdout + result.stderr, explain(result)


# ---- Resume -----------------------------------------------------------------------------------

def test_rerunning_a_finished_run_does_nothing(cli_env, tmp_path):
  """The same command twice: the second run finds the finished run, says so, and neither
  trains nor rewrites its metrics or checkpoints."""
  workdir = tmp_path / 'run'
  command = [TINY, f'--workdir={workdir}']
  first = main_py(cli_env, *command)
  assert first.returncode == 0, explain(first)
  summary = read_json(workdir / 'summary.json')
  metrics = (workdir / 'metrics.jsonl').read_text()
  steps = step_dirs(workdir / 'checkpoints')

  start = time.perf_counter()
  again = main_py(cli_env, *command)
  print(f'rerun took {time.perf_counter() - start:.1f} s')
  assert again.returncode == 0, explain(again)
  assert re.search(r'nothing to do', again.stderr, re.IGNORECASE), explain(again)
  assert not re.search(r'^step \d+/', again.stderr, re.MULTILINE), 'the rerun trained'
  assert read_json(workdir / 'summary.json')['final_step'] == summary['final_step']
  assert (workdir / 'metrics.jsonl').read_text() == metrics
  assert step_dirs(workdir / 'checkpoints') == steps


def test_a_second_run_compiles_nothing_new_with_the_default_compilation_cache(cli_env,
                                                                           tmp_path):
  """main.py keeps compiled programs in ~/.cache/llmopt_jax/xla by default: a first run fills
  it; a second run of the same config in another workdir finds every program there (it
  stores no new entry) and ends with the same metrics."""
  env = {**cli_env, 'HOME': str(tmp_path / 'home')}
  env.pop('JAX_COMPILATION_CACHE_DIR')  # the suite's own cache would take precedence
  env.pop('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS')  # main.py's own: keep every program
  cache = tmp_path / 'home' / '.cache' / 'llmopt_jax' / 'xla'
  first = main_py(env, TINY, f'--workdir={tmp_path / "first"}')
  assert first.returncode == 0, explain(first)
  stored = sorted(os.listdir(cache))
  assert stored, 'the first run stored no compiled program'

  second = main_py(env, TINY, f'--compilation_cache={cache}', f'--workdir={tmp_path / "second"}')
  assert second.returncode == 0, explain(second)
  assert sorted(os.listdir(cache)) == stored  # every program was found, none compiled anew
  assert (read_json(tmp_path / 'second' / 'summary.json')['final_eval']
          == read_json(tmp_path / 'first' / 'summary.json')['final_eval'])

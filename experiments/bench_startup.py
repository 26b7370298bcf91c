"""Start-up: seconds from the command to a run's first training step, cold and with the
persistent compilation cache warm, against JAX's default of caching only slow compiles.

  python experiments/bench_startup.py                       # ~10 min on 2 CPU cores
  python experiments/bench_startup.py --configs=pretrain_tiny --repeats=1
  python experiments/bench_startup.py --out=experiments/results/bench_startup.md

Each run is `main.py` in a subprocess on a fresh workdir, as a user types it; the clock stops
when its first training record reaches metrics.jsonl (logged every step here), so the figure
is import + data + model + tracing + compilation + the first step. Per config, in one run:

  cold            an empty cache directory
  warm            the same directory again (llmopt_jax/compile_cache.py keeps every program)
  warm, JAX's 1 s  a second directory filled and reused with
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1, JAX's own default (only
                  programs that took a second or more to compile are kept)

and the import of tensorboardX (the loop's TensorBoard writer) with PyTorch visible, as
tensorboardX imports it when installed, against llmopt_jax's import that hides it.
The medians of --repeats runs are printed.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402  (after the path fix above)

from llmopt_jax import compare  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    'pretrain_tiny': ['--config=configs/pretrain.py:tiny'],
    'finetune_tiny': ['--config=configs/finetune.py:tiny'],
    'finetune': ['--config=configs/finetune.py', '--config.export=False'],
}
_CONFIGS = flags.DEFINE_list('configs', list(CONFIGS), f'From {",".join(CONFIGS)}.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Runs per cell (the median is shown).',
                                lower_bound=1)
_OUT = flags.DEFINE_string('out', '', 'Also write the table (markdown) here.')
TIMEOUT_S = 900
# Three steps, each logged; no warmup, which a config's own may outlast (the default
# fine-tune's 80 steps are refused for a 3-step run).
EVERY_STEP = ['--config.train.log_every=1', '--config.train.num_steps=3',
              '--config.optim.warmup_steps=0']


def seconds_to_first_step(args: list[str], cache: str, env: dict[str, str]) -> float:
  """Starts main.py, returns the seconds until its first training record, then stops it."""
  workdir = tempfile.mkdtemp(prefix='startup_')
  metrics = os.path.join(workdir, 'metrics.jsonl')
  started = time.perf_counter()
  proc = subprocess.Popen(
      [sys.executable, 'main.py', *args, *EVERY_STEP, f'--compilation_cache={cache}',
       f'--workdir={workdir}'], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  try:
    while not _has_training_record(metrics):
      if proc.poll() is not None:
        raise RuntimeError(f'{args}: exited {proc.returncode} first: {proc.stderr.read()[-2000:]}')
      if time.perf_counter() - started > TIMEOUT_S:
        raise TimeoutError(f'{args}: no training step after {TIMEOUT_S} s')
      time.sleep(0.02)
    return time.perf_counter() - started
  finally:
    proc.kill()
    proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)


def _has_training_record(path: str) -> bool:
  if not os.path.exists(path):
    return False
  with open(path, encoding='utf-8') as f:
    return any('train/loss' in json.loads(line) for line in f if line.endswith('\n'))


def import_seconds(hide_torch: bool) -> float:
  """Seconds to import tensorboardX's writer in a fresh interpreter."""
  code = ('import time; t = time.perf_counter(); '
          + ('from llmopt_jax.train import logger; logger._summary_writer(); '
             if hide_torch else 'from tensorboardX import SummaryWriter; ')
          + 'print(time.perf_counter() - t)')
  if hide_torch:  # the logger module's own imports (jax, tqdm) are not the writer's cost
    code = 'import jax, tqdm; ' + code
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       check=True)
  return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
  del argv
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_COMPILATION_CACHE_DIR', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS')}
  rows = []
  for name in _CONFIGS.value:
    if name not in CONFIGS:
      raise app.UsageError(f'--configs: unknown {name!r}; choose from {list(CONFIGS)}')
    cells = {'cold': [], 'warm': [], 'cold_jax_default': [], 'warm_jax_default': []}
    for _ in range(_REPEATS.value):
      ours, theirs = tempfile.mkdtemp(), tempfile.mkdtemp()
      default_env = {**env, 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '1'}
      cells['cold'].append(seconds_to_first_step(CONFIGS[name], ours, env))
      cells['warm'].append(seconds_to_first_step(CONFIGS[name], ours, env))
      cells['cold_jax_default'].append(seconds_to_first_step(CONFIGS[name], theirs, default_env))
      cells['warm_jax_default'].append(seconds_to_first_step(CONFIGS[name], theirs, default_env))
      shutil.rmtree(ours), shutil.rmtree(theirs)
    median = {k: statistics.median(v) for k, v in cells.items()}
    rows.append([name, f'{median["cold"]:.1f}', f'{median["warm"]:.1f}',
                 f'{median["warm_jax_default"]:.1f}',
                 f'{median["warm_jax_default"] / median["warm"]:.2f}x'])
    print(rows[-1], flush=True)
  table = compare.markdown_table(
      ['config', 'cold cache, s', 'warm cache, s', "warm cache at JAX's 1 s threshold, s",
       'warm speed-up'], rows)
  hidden = statistics.median(import_seconds(True) for _ in range(3))
  visible = statistics.median(import_seconds(False) for _ in range(3))
  when = datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')
  text = (f'# Start-up: seconds from the command to the first training step\n\n'
          f'**Command.** `python experiments/bench_startup.py --configs={",".join(_CONFIGS.value)}'
          f' --repeats={_REPEATS.value}`\n\n**Date.** {when}. **Machine.** {platform.machine()}, '
          f'{os.cpu_count()} CPU cores, {platform.platform()}. Medians of {_REPEATS.value}.\n\n'
          f'{table}\nImporting tensorboardX\'s writer: {visible:.2f} s with PyTorch visible '
          f'(it imports torch when installed), {hidden:.2f} s as llmopt_jax imports it '
          f'(torch hidden).\n')
  print(text)
  if _OUT.value:
    with open(_OUT.value, 'w', encoding='utf-8') as f:
      f.write(text)


if __name__ == '__main__':
  app.run(main)

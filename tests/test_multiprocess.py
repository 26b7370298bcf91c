"""Two processes on localhost (4 simulated CPU devices each, gloo collectives) train like one.

The processes read disjoint data shards, agree on the loss, save and restore a checkpoint, and
end with the parameters of a single process driving all 8 devices.
"""

import os
import re
import socket
import subprocess
import sys

import jax
import pytest

import tolerances
from conftest import REPO, load_config, restore_state
from llmopt_jax.train.checkpoint import Checkpoints

TIMEOUT_S = 240
# A constant learning rate, so that extending num_steps on resume changes nothing.
COMMON = ['--config=configs/pretrain.py:tiny', '--config.data.num_shards=2',
          '--config.optim.schedule=constant', '--config.optim.warmup_steps=0',
          '--config.train.log_every=1']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(tfds_dir: str, devices: int) -> dict:
  # The caller's XLA flags (an instruction-set cap, say) with this run's device count.
  flags = [flag for flag in os.environ.get('XLA_FLAGS', '').split()
           if not flag.startswith('--xla_force_host_platform_device_count')]
  env = dict(os.environ, TFDS_DATA_DIR=tfds_dir, JAX_PLATFORMS='cpu', XLA_FLAGS=' '.join(
      [*flags, f'--xla_force_host_platform_device_count={devices}']))
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  return env


def _run_two_processes(workdir, steps: int, tfds_dir: str) -> list[str]:
  """Runs main.py as processes 0 and 1 of a 2-process job; returns their outputs."""
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, 'main.py', *COMMON, f'--config.train.num_steps={steps}',
       f'--workdir={workdir}', f'--coordinator_address=localhost:{port}',
       '--num_processes=2', f'--process_id={i}'],
      cwd=REPO, env=_env(tfds_dir, 4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
  finally:
    for p in procs:  # a hung collective must not outlive the test
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def _final_loss(output: str, process: int) -> str:
  match = re.search(rf'process {process}/2: step \d+, train loss (\S+)', output)
  assert match, output[-2000:]
  return match.group(1)


def _progress(workdir, step: int) -> dict:
  checkpoints = Checkpoints(str(workdir / 'checkpoints'), keep_last=10, keep_best=0,
                            best_metric='eval/loss', best_mode='min')
  return checkpoints.restore_progress(step)


@pytest.mark.skipif(not hasattr(jax.distributed, 'initialize'), reason='no jax.distributed')
def test_two_processes_match_one_process_with_eight_devices(tmp_path, tfds_dir):
  # Prepare the shipped set once, so the two processes do not race to build it.
  from llmopt_jax.data import sources
  sources.load_text_source('tiny_shakespeare', 'train', data_dir=tfds_dir)

  two = tmp_path / 'two'
  first = _run_two_processes(two, 4, tfds_dir)
  # One replicated value that both processes print: the same text.
  assert _final_loss(first[0], 0) == _final_loss(first[1], 1)

  # Disjoint data: each process saved the position of its own shard, shard 0 and shard 1.
  shards = [p['shards'] for p in _progress(two, 4)['data']]
  assert [[s['shard_index'] for s in process] for process in shards] == [[0], [1]]

  resumed = _run_two_processes(two, 6, tfds_dir)  # restores step 4, trains to 6
  assert 'Resumed from' in resumed[0]
  assert _final_loss(resumed[0], 0) == _final_loss(resumed[1], 1)

  one = tmp_path / 'one'
  single = subprocess.run(
      [sys.executable, 'main.py', *COMMON, '--config.train.num_steps=6', f'--workdir={one}'],
      cwd=REPO, env=_env(tfds_dir, 8), capture_output=True, text=True, timeout=TIMEOUT_S)
  assert single.returncode == 0, single.stderr[-3000:]

  a, b = restore_state(two, 6), restore_state(one, 6)
  # Gloo and the in-process CPU collectives may sum the 8 partial gradients in different
  # orders, so equality is to float32 rounding, not bitwise: a gradient sums over the batch's
  # tokens what the forward and backward paths computed, and Adam (constant lr) takes 6 steps.
  config = load_config('pretrain', 'tiny')
  terms = (config.train.batch_size * config.data.seq_len
           + 2 * tolerances.forward_terms(config.model, config.data.seq_len))
  tolerances.assert_adam_params_close(
      jax.tree.leaves(a['params']), jax.tree.leaves(b['params']), 6 * config.optim.lr, terms)

"""Training-step benchmark: step time, tokens/s and MFU of a config's train step.

  python experiments/bench_train.py --config=configs/pretrain.py
  python experiments/bench_train.py --config=configs/pretrain.py:tiny --steps=50 --warmup=5
  python experiments/bench_train.py --config=configs/pretrain.py:model=base \
      --config.model.dtype=bfloat16 --config.train.batch_size=64

The task and the born-sharded state are built exactly as `pretrain.run` and `loop.train` build
them, so the step timed here is the step that trains. Batches are moved onto the devices
before the clock starts, so the figure is the step and not the input pipeline, whose own rate
is measured on the same batches and printed beside it. MFU = tokens/s * FLOPs/token / peak,
against a matmul peak measured on the same devices and, where one is known, the datasheet.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

# Run as a script, Python puts experiments/ on the path, not the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the path fix above)
import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from llmopt_jax import cli, optim, perf, sharding  # noqa: E402
from llmopt_jax.models import stats  # noqa: E402
from llmopt_jax.stages import pretrain  # noqa: E402
from llmopt_jax.train import loop  # noqa: E402
from llmopt_jax.train import state as state_lib  # noqa: E402
from llmopt_jax.train import step as step_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config, e.g. configs/pretrain.py:tiny.', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 20, 'Train steps inside the timed window.', lower_bound=1)
_WARMUP = flags.DEFINE_integer(
    'warmup', 3, 'Untimed steps first (compilation is apart).', lower_bound=1)
flags.mark_flags_as_required(['config'])


def benchmark(config: ml_collections.ConfigDict, steps: int = 20, warmup: int = 3, *,
              matmul_size: int | None = None) -> dict[str, Any]:
  """Times `steps` train steps of `config` after `warmup` ones; returns the figures.

  `matmul_size` overrides the per-backend size of the peak-measuring matmul (tests shrink it).
  """
  if steps < 1 or warmup < 1:
    raise ValueError(f'steps={steps} and warmup={warmup} must both be >= 1')
  with tempfile.TemporaryDirectory() as workdir:  # the BPE tokenizer is written here
    task, model = pretrain.build_task(config, workdir)
    mesh = sharding.make_mesh(config.mesh.shape)
    rules = config.mesh.rules.to_dict()
    state, jitted = _state_and_step(config, task, mesh, rules)
    batches, input_batches_per_s = _prefetch(task.train_data, warmup + steps, mesh, rules)

  # Compiled once, ahead of time, so the executable we time is the one whose memory we report.
  compiled = jitted.lower(state, batches[0]).compile()
  step_s = _seconds_per_step(compiled, state, batches[:warmup], batches[warmup:])

  devices = list(mesh.devices.flat)
  tokens_per_s = config.train.batch_size * config.data.seq_len / step_s
  flops_per_token = stats.flops_per_token(model, config.data.seq_len)
  model_flops_per_s = tokens_per_s * flops_per_token
  matmul_peak = perf.measure_matmul_peak(size=matmul_size, devices=devices)
  sheet = perf.datasheet_peak(devices[0])
  sheet_peak = None if sheet is None else sheet * len(devices)
  return {
      'device_kind': devices[0].device_kind,
      'num_devices': len(devices),
      'params': stats.count_params(model),
      'tokens_per_step': config.train.batch_size * config.data.seq_len,
      'step_s': step_s,
      'tokens_per_s': tokens_per_s,
      'input_batches_per_s': input_batches_per_s,
      'flops_per_token': flops_per_token,
      'model_flops_per_s': model_flops_per_s,
      'matmul_peak': matmul_peak,
      'mfu': model_flops_per_s / matmul_peak,
      'datasheet_peak': sheet_peak,
      'mfu_datasheet': None if sheet_peak is None else model_flops_per_s / sheet_peak,
      'memory': _memory(compiled),
  }


def _state_and_step(config: ml_collections.ConfigDict, task: loop.Task, mesh: Mesh,
                    rules: sharding.Rules) -> tuple[state_lib.TrainState, Any]:
  """The born-sharded state and the jitted train step, made the way `loop.train` makes them."""
  tx = optim.make_optimizer(config.optim, config.train.num_steps)
  graphdef, init = state_lib.init_fn(task.build_model, tx, config.seed)
  _, shardings = state_lib.abstract_and_shardings(init, mesh, rules)
  train_step = step_lib.make_train_step(
      graphdef, tx, task.loss_fn, seed=config.seed,
      num_micro_batches=config.train.num_micro_batches)
  eval_step = step_lib.make_eval_step(graphdef, task.eval_fn)
  jitted, _ = step_lib.jit_steps(train_step, eval_step, shardings, mesh, rules)
  return state_lib.initialize(init, shardings), jitted


def _prefetch(data: loop.ResumableIterator, count: int, mesh: Mesh, rules: sharding.Rules
              ) -> tuple[list[dict], float]:
  """`count` batches placed on the devices, and how many per second the pipeline made."""
  start = time.perf_counter()
  batches = [sharding.shard_batch(next(data), mesh, rules) for _ in range(count)]
  jax.block_until_ready(batches)
  return batches, count / (time.perf_counter() - start)


def _seconds_per_step(step, state, warmup: list, timed: list) -> float:
  """Mean seconds per step over the `timed` batches, after running the `warmup` ones."""
  state = _run(step, state, warmup)
  start = time.perf_counter()
  _run(step, state, timed)
  return (time.perf_counter() - start) / len(timed)


def _run(step, state, batches: list):
  """Runs `step` over `batches`; returns once the devices are done with the last one.

  Each step is dispatched before we wait for the one before it, so the devices always have
  the next step queued and never idle on the host. The queue is kept at two steps rather than
  left to grow: with ~100 queued steps, XLA's CPU runtime deadlocks in the all-reduce of
  simulated devices (seen with 8 devices on 2 cores).
  """
  previous = None
  for batch in batches:
    state, metrics = step(state, batch)  # the state is donated: always use the latest one
    jax.block_until_ready(previous)
    previous = metrics
  return jax.block_until_ready(state)


def _memory(compiled) -> dict[str, int] | None:
  """Bytes of the compiled step's arguments, outputs and temporaries, per device."""
  analysis = compiled.memory_analysis()
  if analysis is None:  # not every backend reports it
    return None
  names = ('argument', 'output', 'alias', 'temp')
  return {name: getattr(analysis, f'{name}_size_in_bytes', None) for name in names}


def _si(value: float, unit: str) -> str:
  for scale, prefix in ((1e15, 'P'), (1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(value) >= scale:
      return f'{value / scale:.3g} {prefix}{unit}'
  return f'{value:.3g} {unit}'


def format_table(r: dict[str, Any]) -> str:
  """The figures of `benchmark` as aligned `name  value` lines."""
  rows = [
      ('device', f'{r["num_devices"]} x {r["device_kind"]}'),
      ('model params', f'{r["params"] / 1e6:.2f}M'),
      ('tokens / step', f'{r["tokens_per_step"]}'),
      ('step time', f'{r["step_s"] * 1e3:.2f} ms'),
      ('tokens / s', f'{r["tokens_per_s"]:,.0f}'),
      ('input pipeline', f'{r["input_batches_per_s"]:.1f} batches/s '
                         f'(the step needs {1 / r["step_s"]:.1f})'),
      ('model FLOPs / token', _si(r['flops_per_token'], 'FLOP')),
      ('achieved model FLOP/s', _si(r['model_flops_per_s'], 'FLOP/s')),
      ('measured matmul peak', _si(r['matmul_peak'], 'FLOP/s')),
      ('MFU vs measured peak', f'{r["mfu"]:.1%}'),
  ]
  if r['datasheet_peak'] is not None:
    rows += [('datasheet bf16 peak', _si(r['datasheet_peak'], 'FLOP/s')),
             ('MFU vs datasheet', f'{r["mfu_datasheet"]:.1%}')]
  memory = r['memory']
  rows += [('step memory / device', 'not reported by this backend' if memory is None else
            ', '.join(f'{k} {v / 2**20:.1f} MiB' for k, v in memory.items() if v is not None))]
  width = max(len(name) for name, _ in rows)
  return '\n'.join(f'{name:<{width}}  {value}' for name, value in rows)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  name = config_flags.get_config_filename(flags.FLAGS['config'])
  print(f'Benchmarking {name}: {_WARMUP.value} warm-up steps, {_STEPS.value} timed.',
        flush=True)
  print(format_table(benchmark(config, steps=_STEPS.value, warmup=_WARMUP.value)))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

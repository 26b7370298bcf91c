"""Training-step benchmark: step time, tokens/s and MFU of a config's train step.

  python experiments/bench_train.py --config=configs/pretrain.py
  python experiments/bench_train.py --config=configs/pretrain.py:tiny --steps=50 --warmup=5
  python experiments/bench_train.py --config=configs/pretrain.py:model=base \
      --config.model.dtype=bfloat16 --config.train.batch_size=64
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python experiments/bench_train.py --config=configs/pretrain.py:tiny --mesh=all

The task and the born-sharded state are built exactly as `pretrain.run` and `loop.train` build
them, so the step timed here is the step that trains. Batches are moved onto the devices
before the clock starts, so the figure is the step and not the input pipeline, whose own rate
is measured on the same batches and printed beside it. MFU = tokens/s * FLOPs/token / peak,
against a matmul peak measured on the same devices and, where one is known, the datasheet.

`--mesh=fsdp,tensor` (or `all`) runs the same config under each mesh preset of
`llmopt_jax/sharding.py` and prints one row per preset: step time, tokens/s, MFU and per-device
memory of the parameters, the optimizer state and the step's temporaries. A preset whose mesh
does not fit the model or the batch gets its one-line error in place of figures.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

# Run as a script, Python puts experiments/ on the path, not the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the path fix above)
import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from llmopt_jax import cli, configlib, perf, sharding  # noqa: E402
from llmopt_jax.models import stats  # noqa: E402
from llmopt_jax.tasks import lm  # noqa: E402
from llmopt_jax.train import benchmark as benchmark_lib  # noqa: E402
from llmopt_jax.train import memory as memory_lib  # noqa: E402
from llmopt_jax.train.config import TrainConfig  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config, e.g. configs/pretrain.py:tiny.', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 20, 'Train steps inside the timed window.', lower_bound=1)
_WARMUP = flags.DEFINE_integer(
    'warmup', 3, 'Untimed steps first (compilation is apart).', lower_bound=1)
_MESH = flags.DEFINE_list(
    'mesh', [], 'Mesh presets to compare (data, fsdp, tensor, fsdp_tensor) or "all"; '
    'default: the config\'s own mesh.')
flags.mark_flags_as_required(['config'])


def benchmark(config: ml_collections.ConfigDict, steps: int = 20, warmup: int = 3, *,
              matmul_size: int | None = None, matmul_peak: float | None = None
              ) -> dict[str, Any]:
  """Times `steps` train steps of `config` after `warmup` ones; returns the figures.

  `matmul_size` overrides the per-backend size of the peak-measuring matmul (tests shrink it);
  `matmul_peak` reuses a peak measured before (one for several meshes of the same devices).
  """
  if steps < 1 or warmup < 1:
    raise ValueError(f'steps={steps} and warmup={warmup} must both be >= 1')
  with tempfile.TemporaryDirectory() as workdir:  # the BPE tokenizer is written here
    built = lm.pretraining(config, workdir)
    task, model = built.task, built.card.model
    first = next(task.train_data)
    # Compiled once, ahead of time, so the executable we time is the one whose memory we report.
    step, state = benchmark_lib.compile_train_step(TrainConfig.from_config(config), task, first)
    batches, input_batches_per_s = benchmark_lib.device_batches(
        task.train_data, warmup + steps, step)
  memory = memory_lib.memory(state, step.step)  # before the steps donate `state`
  step_s, _ = benchmark_lib.seconds_per_step(step, state, batches[:warmup], batches[warmup:])

  mesh = step.setup.mesh
  devices = list(mesh.devices.flat)
  tokens_per_s = config.train.batch_size * config.data.seq_len / step_s
  flops_per_token = stats.flops_per_token(model, config.data.seq_len)
  model_flops_per_s = tokens_per_s * flops_per_token
  matmul_peak = matmul_peak or perf.measure_matmul_peak(size=matmul_size, devices=devices)
  sheet = perf.datasheet_peak(devices[0])
  sheet_peak = None if sheet is None else sheet * len(devices)
  return {
      'device_kind': devices[0].device_kind,
      'num_devices': len(devices),
      'mesh': dict(mesh.shape),
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
      'params_per_device': memory['params'],
      'opt_state_per_device': memory['opt_state'],
      'memory': memory['compiled'],
  }


def format_table(r: dict[str, Any]) -> str:
  """The figures of `benchmark` as aligned `name  value` lines."""
  rows = [
      ('device', f'{r["num_devices"]} x {r["device_kind"]}'),
      ('model params', f'{r["params"] / 1e6:.2f}M'),
      ('tokens / step', f'{r["tokens_per_step"]}'),
      ('step time', f'{r["step_s"] * 1e3:.2f} ms'),
      ('tokens / s', f'{r["tokens_per_s"]:,.0f}'),
      ('input pipeline', (f'{r["input_batches_per_s"]:.1f} batches/s '
                          f'(the step needs {1 / r["step_s"]:.1f})')),
      ('model FLOPs / token', perf.si(r['flops_per_token'], 'FLOP')),
      ('achieved model FLOP/s', perf.si(r['model_flops_per_s'], 'FLOP/s')),
      ('measured matmul peak', perf.si(r['matmul_peak'], 'FLOP/s')),
      ('MFU vs measured peak', f'{r["mfu"]:.1%}'),
  ]
  if r['datasheet_peak'] is not None:
    rows += [('datasheet bf16 peak', perf.si(r['datasheet_peak'], 'FLOP/s')),
             ('MFU vs datasheet', f'{r["mfu_datasheet"]:.1%}')]
  rows += [('mesh', _mesh_text(r['mesh'])),
           ('params / device', memory_lib.format_bytes(r['params_per_device'])),
           ('opt state / device', memory_lib.format_bytes(r['opt_state_per_device']))]
  memory = r['memory']
  rows += [('step memory / device', 'not reported by this backend' if memory is None else
            ', '.join(f'{k} {memory_lib.format_bytes(v)}' for k, v in memory.items()))]
  width = max(len(name) for name, _ in rows)
  return '\n'.join(f'{name:<{width}}  {value}' for name, value in rows)


def _mesh_text(shape: dict[str, int]) -> str:
  return ' x '.join(f'{name} {size}' for name, size in shape.items())


def with_mesh(config: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  """A copy of `config` with the mesh section of `preset`."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.mesh = configlib.mesh(preset)
  return config


def format_comparison(results: dict[str, dict[str, Any] | str]) -> str:
  """One row per preset (its figures, or the error that ruled it out)."""
  header = ('mesh', 'data x fsdp x tensor', 'step ms', 'tokens/s', 'MFU', 'params/dev',
            'opt state/dev', 'temps/dev')
  rows, errors = [header], []
  for preset, r in results.items():
    if isinstance(r, str):
      errors.append(f'{preset}: {r}')
      continue
    temps = '-' if r['memory'] is None else memory_lib.format_bytes(r['memory']['temp'])
    rows.append((preset, ' x '.join(str(v) for v in r['mesh'].values()),
                 f'{r["step_s"] * 1e3:.2f}', f'{r["tokens_per_s"]:,.0f}', f'{r["mfu"]:.1%}',
                 memory_lib.format_bytes(r['params_per_device']),
                 memory_lib.format_bytes(r['opt_state_per_device']), temps))
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  lines = ['  '.join(f'{v:<{w}}' if i == 0 else f'{v:>{w}}'
                     for i, (v, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
  return '\n'.join(lines + [f'not run: {e}' for e in errors])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  name = config_flags.get_config_filename(flags.FLAGS['config'])
  presets = list(sharding.MESH_PRESETS) if _MESH.value == ['all'] else _MESH.value
  unknown = sorted(set(presets) - set(sharding.MESH_PRESETS))
  if unknown:
    cli.fail(f'--mesh: unknown presets {unknown}; choose from {list(sharding.MESH_PRESETS)} '
             'or all')
  print(f'Benchmarking {name} on {jax.device_count()} x {jax.devices()[0].device_kind}: '
        f'{_WARMUP.value} warm-up steps, {_STEPS.value} timed.', flush=True)
  if not presets:
    print(format_table(benchmark(config, steps=_STEPS.value, warmup=_WARMUP.value)))
    return
  # Every preset spans all the devices: one peak serves them all.
  peak = perf.measure_matmul_peak(devices=jax.devices())
  results: dict[str, dict[str, Any] | str] = {}
  for preset in presets:
    try:
      results[preset] = benchmark(with_mesh(config, preset), steps=_STEPS.value,
                                  warmup=_WARMUP.value, matmul_peak=peak)
    except ValueError as e:  # the mesh does not fit the model or the batch
      results[preset] = cli.one_line(e)
  print(f'MFU against a measured matmul peak of {perf.si(peak, "FLOP/s")}.')
  print(format_comparison(results))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

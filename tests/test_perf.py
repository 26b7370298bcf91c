"""Machine measurements (llmopt_jax/perf.py) and the training benchmark built on them."""

import importlib.util
import math
import os
import time
import types

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO, load_config
from llmopt_jax import perf


def fake_device(kind: str, platform: str = 'gpu') -> types.SimpleNamespace:
  return types.SimpleNamespace(device_kind=kind, platform=platform)


def test_time_fn_measures_per_call_seconds():
  seconds = perf.time_fn(time.sleep, 0.01, warmup=0, repeats=3, number=2)
  assert 0.009 < seconds < 0.05


def test_measure_matmul_peak_is_positive_and_finite():
  peak = perf.measure_matmul_peak(size=128, repeats=2)
  assert math.isfinite(peak) and peak > 0


def test_matmul_peak_of_several_devices_is_their_total():
  # Each device does one matmul per call; the FLOPs are counted once per device, so the
  # total over the 8 simulated devices (which share the host's cores) stays a real number.
  peak = perf.measure_matmul_peak(size=128, repeats=2, devices=jax.devices())
  assert math.isfinite(peak) and peak > 0


def test_datasheet_peak_is_none_on_cpu():
  assert perf.datasheet_peak(jax.devices('cpu')[0]) is None


@pytest.mark.parametrize('kind, expected', [
    ('NVIDIA H100 80GB HBM3', 989e12),
    ('NVIDIA H100 PCIe', 756e12),
    ('NVIDIA H200', 989e12),
    ('NVIDIA A100-SXM4-80GB', 312e12),
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5', 459e12),
    ('TPU v6 lite', 918e12),
])
def test_datasheet_peak_by_device_kind(kind, expected):
  assert perf.datasheet_peak(fake_device(kind)) == expected


def test_datasheet_peak_of_an_unknown_accelerator_is_none():
  assert perf.datasheet_peak(fake_device('Some Future Chip')) is None


@pytest.fixture(scope='module')
def bench_train():
  """experiments/bench_train.py as a module (experiments/ is scripts, not a package)."""
  path = os.path.join(REPO, 'experiments', 'bench_train.py')
  spec = importlib.util.spec_from_file_location('bench_train', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_benchmark_tiny(bench_train, tfds_dir):
  config = load_config('pretrain', 'tiny')
  config.data.tfds_data_dir = tfds_dir
  result = bench_train.benchmark(config, steps=2, warmup=1, matmul_size=128)

  assert result['num_devices'] == len(jax.devices())
  assert result['tokens_per_step'] == config.train.batch_size * config.data.seq_len
  assert result['tokens_per_s'] > 0 and result['input_batches_per_s'] > 0
  # The same float64 formula on the same numbers: isclose's default rel 1e-9 only absorbs
  # another order of the product.
  assert math.isclose(result['mfu'], result['tokens_per_s'] * result['flops_per_token']
                      / result['matmul_peak'])
  assert 0 < result['mfu'] < 10  # sanity only: the peak is measured, hence noisy
  assert result['datasheet_peak'] is None and result['mfu_datasheet'] is None
  assert 'MFU vs measured peak' in bench_train.format_table(result)
  if result['memory'] is not None:  # the state is replicated: params and two Adam moments
    param_bytes = result['params'] * jnp.dtype(config.model.param_dtype).itemsize
    assert result['memory']['argument'] >= 3 * param_bytes

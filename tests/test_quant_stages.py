"""The quantization stages end to end: configs/ptq.py:tiny and configs/qat.py:tiny (with
distillation, and on a language model with learned scales), their reports and files, and
bad input that fails before anything trains."""

import json
import os
import types

import jax
import numpy as np
import pytest
from safetensors import safe_open

from conftest import load_config, load_finished, restore_state, tiny_bert
from llmopt_jax import stages
from llmopt_jax.quant import checkpoint, kernels, storage
from llmopt_jax.stages import ptq, qat
from test_distill import _shrink, _tree_digest


def _rows(report: dict) -> dict[str, dict]:
  return {row['model']: row for row in report['rows']}


@pytest.fixture(scope='module')
def ptq_run(tmp_path_factory):
  """configs/ptq.py:tiny on a tiny BERT: the source fine-tune is trained inside the run."""
  root = tmp_path_factory.mktemp('ptq')
  start = tiny_bert(str(root / 'bert'))
  config = load_config('ptq', 'tiny')
  config.init.model = config.source.config.init.model = start
  config.test_batches = config.source.config.test_batches = 1
  _shrink(config.source.config, 2)
  workdir = root / 'run'
  report = ptq.run(config, str(workdir))
  return types.SimpleNamespace(config=config, workdir=workdir, report=report, start=start)


def test_ptq_report_has_a_row_per_variant_sized_from_its_files(ptq_run):
  with open(ptq_run.workdir / 'report.json', encoding='utf-8') as f:
    rows = _rows(json.load(f))
  assert list(rows) == ['float32', 'bfloat16', 'int8 PTQ', 'int4-g128 PTQ']
  for name, row in rows.items():
    directory = ptq_run.workdir / row['directory']
    assert row['bytes'] == storage.weight_bytes(str(directory)), name
    assert 0 <= row['accuracy'] <= 1 and row['latency_ms_b1'] > 0, name
    assert row['params'] == rows['float32']['params']
  ratio = lambda name: rows['float32']['bytes'] / rows[name]['bytes']
  # File sizes, no arithmetic: exactly half the payload, plus each file's header (a JSON entry
  # per tensor: kilobytes against megabytes of payload).
  assert ratio('bfloat16') == pytest.approx(2.0, rel=1e-3)
  # The tiny BERT is 32 wide: a float32 scale per 32 weights of a row costs 1 bit per weight
  # (8 -> 9, 4 -> 5 bits), and the head and position tables stay float; 4x and 8x are met by
  # wide matrices (test_quant_storage).
  assert 3.4 < ratio('int8 PTQ') <= 4 and 6.0 < ratio('int4-g128 PTQ') <= 8
  text = (ptq_run.workdir / 'report.md').read_text()
  assert all(name in text for name in rows)


def test_ptq_files_hold_integers_that_load_as_quantized_kernels(ptq_run):
  directory = ptq_run.workdir / 'ptq-int4-g128'
  with safe_open(str(directory / 'model.safetensors'), 'np') as f:
    packed = f.get_tensor('backbone/blocks/0/mlp/up.qvalue')
  assert packed.dtype == np.uint8  # two int4 values per byte
  with safe_open(str(ptq_run.workdir / 'ptq-int8' / 'model.safetensors'), 'np') as f:
    assert f.get_tensor('backbone/blocks/0/mlp/up.qvalue').dtype == np.int8
    assert f.get_tensor('classifier/kernel').dtype == np.float32  # the head is excluded
  source = str(ptq_run.workdir / 'source')
  like = load_finished(source)[1]
  params, recipe, _ = checkpoint.load(str(directory), like)
  up = params['backbone']['blocks'][0]['mlp']['up'].get_value()
  assert isinstance(up, kernels.QuantizedKernel) and recipe.bits == 4
  assert packed.size * 2 == up.weight.qvalue.size
  values = np.asarray(up.weight.qvalue, np.int8)
  assert values.min() >= -8 and values.max() <= 7


def test_qat_with_distillation_trains_from_the_source_and_leaves_it_unchanged(ptq_run, tmp_path):
  source = str(ptq_run.workdir / 'source')
  before = _tree_digest(source)
  config = load_config('qat', f'tiny,distill=True,source={source}')
  config.init.model = ptq_run.start
  config.test_batches = 1
  _shrink(config, 2)
  report = qat.run(config, str(tmp_path))
  rows = _rows(report)
  assert list(rows) == ['float32', 'bfloat16', 'int4-g128 PTQ', 'int4-g128 QAT']
  assert rows['int4-g128 QAT']['bytes'] == rows['int4-g128 PTQ']['bytes']
  assert storage.weight_bytes(str(tmp_path / 'qat-int4-g128' / 'quantized')) > 0
  with open(tmp_path / 'qat-int4-g128' / 'metrics.jsonl', encoding='utf-8') as f:
    logged = [json.loads(line) for line in f]
  assert any('train/kd_loss' in m for m in logged)  # the distillation objective trained it
  assert _tree_digest(source) == before


def test_qat_on_a_language_model_learns_its_scales(pretrain_workdir, tfds_dir, tmp_path):
  config = load_config('qat', f'tiny,task=lm,source={pretrain_workdir}')
  config.data.tfds_data_dir = tfds_dir
  config.quant.scale = 'learned'
  _shrink(config, 2)
  rows = _rows(qat.run(config, str(tmp_path)))
  assert list(rows) == ['float32', 'bfloat16', 'int4-g64 PTQ', 'int4-g64 QAT']
  for name, row in rows.items():
    assert np.isfinite(row['val_loss']), name
  state = restore_state(tmp_path / 'qat-int4-g64', 2)
  scales = state['params']['qscale']
  assert scales and all(np.all(np.asarray(x) > 0) for x in jax.tree.leaves(scales))


@pytest.mark.parametrize('stage, field, value, message', [
    ('ptq', 'variants', ('int3',), r"config\.variants: 'int3'"),
    ('qat', 'variants', ('int8-row',), r"config\.variants: 'int8-row'"),
    ('ptq', 'quant.activations', 'int8', r"config\.quant\.activations='int8'"),
    ('ptq', 'quant.calibration', 'kl', r"config\.quant\.calibration='kl'"),
    ('qat', 'quant.scale', 'lsq', r"config\.quant\.scale='lsq'"),
])
def test_bad_quantization_field_fails_before_training(stage, field, value, message, tmp_path):
  config = load_config(stage, 'tiny')
  section, _, name = field.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=message) as error:
    stages.run(config, str(tmp_path))
  assert '\n' not in str(error.value)
  assert not os.path.exists(tmp_path / 'source')

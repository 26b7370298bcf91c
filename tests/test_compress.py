"""The `compress` stage end to end (configs/compress.py:tiny on a tiny BERT): structured
pruning, distillation from the dense source, int8 and int4 quantization, one table."""

import json
import os
import types

import numpy as np
import pytest
from safetensors import safe_open

from conftest import load_config, tiny_bert
from llmopt_jax.quant import checkpoint, kernels, storage
from llmopt_jax.stages import compress
from test_distill import _tree_digest

ROWS = ['dense', 'pruned', 'pruned+distilled', 'pruned+distilled+int8',
        'pruned+distilled+int4-g128']


def _config(start: str):
  config = load_config('compress', 'tiny')
  config.init.model = config.source.config.init.model = start
  config.test_batches = config.source.config.test_batches = 1
  source = config.source.config
  source.train.update(num_steps=2, eval_every=2)
  source.checkpoint.every_steps = 2
  config.train.update(num_steps=2, eval_every=2)
  config.checkpoint.every_steps = 2
  config.prune.heads_fraction = 0.5  # the tiny BERT's 2 heads: one goes (0.25 rounds to none)
  return config


def _rows(workdir) -> dict[str, dict]:
  with open(workdir / 'report.json', encoding='utf-8') as f:
    return {row['model']: row for row in json.load(f)['rows']}


@pytest.fixture(scope='module')
def compress_run(tmp_path_factory):
  """configs/compress.py:tiny on a tiny BERT: the source fine-tune is trained inside the run."""
  root = tmp_path_factory.mktemp('compress')
  start = tiny_bert(str(root / 'bert'))
  config = _config(start)
  workdir = root / 'run'
  compress.run(config, str(workdir))
  return types.SimpleNamespace(config=config, workdir=workdir, rows=_rows(workdir), start=start)


def _tensors(compress_run, name):
  """{path: array} of the file of row `name` (sliced and quantized rows store no bitmasks)."""
  tensors, _ = storage.load(str(compress_run.workdir / compress_run.rows[name]['directory']))
  return tensors


def test_one_table_with_a_row_per_step_sized_from_its_files(compress_run):
  rows = compress_run.rows
  assert list(rows) == ROWS
  for row in rows.values():
    assert row['bytes'] == storage.weight_bytes(str(compress_run.workdir / row['directory']))
    assert 0 <= row['accuracy'] <= 1 and row['latency_ms_b1'] > 0 and row['latency_ms_b64'] > 0
  # Slicing shrinks the file; distillation keeps the shapes; the integers shrink it again.
  bytes_ = [rows[name]['bytes'] for name in ROWS]
  assert bytes_[0] > bytes_[1] == bytes_[2] > bytes_[3] > bytes_[4]
  assert rows['dense']['params'] > rows['pruned']['params']
  assert rows['pruned+distilled+int8']['params'] == rows['pruned+distilled']['params']
  text = (compress_run.workdir / 'report.md').read_text()
  assert text.count('\n| pruned') == 4 and all(name in text for name in rows)


def test_the_pruned_models_have_half_the_heads_and_neurons(compress_run):
  """heads_fraction=neurons_fraction=0.5: every attention and MLP matrix of the files is half
  as wide along its unit axis, and distillation trained the sliced weights (they moved)
  without changing their shapes."""
  dense = _tensors(compress_run, 'dense')
  pruned = _tensors(compress_run, 'pruned')
  distilled = _tensors(compress_run, 'pruned+distilled')
  unit_axis = {'q': 1, 'k': 1, 'v': 1, 'o': 0, 'up': 1, 'down': 0}  # heads or neurons
  matrices = [p for p in dense if p.split('/')[-1] in unit_axis]
  assert len(matrices) == 2 * len(unit_axis)
  for path in matrices:
    want = list(dense[path].shape)
    want[unit_axis[path.split('/')[-1]]] //= 2
    assert list(pruned[path].shape) == want == list(distilled[path].shape), path
  assert any(not np.array_equal(pruned[p], distilled[p]) for p in pruned)
  removed = sum(dense[p].size - pruned[p].size for p in matrices)
  assert compress_run.rows['pruned']['sparsity'] == pytest.approx(
      removed / sum(dense[p].size for p in matrices))


def test_the_quantized_rows_hold_integer_kernels_of_the_sliced_model(compress_run):
  workdir = compress_run.workdir
  with safe_open(str(workdir / 'pruned-distilled-int8' / 'model.safetensors'), 'np') as f:
    up = f.get_tensor('backbone/blocks/0/mlp/up.qvalue')
    assert up.dtype == np.int8 and up.shape == (32, 32)  # 32 wide, 64 neurons halved
    assert f.get_tensor('classifier/kernel').dtype == np.float32  # the head stays float
  with safe_open(str(workdir / 'pruned-distilled-int4-g128' / 'model.safetensors'), 'np') as f:
    assert f.get_tensor('backbone/blocks/0/mlp/up.qvalue').dtype == np.uint8  # int4 pairs
  # Read back as the stage reads it: QuantizedKernels of int4 values, shaped like the
  # distilled model's float tree.
  like = _float_tree(_tensors(compress_run, 'pruned+distilled'))
  params, recipe, _ = checkpoint.load(str(workdir / 'pruned-distilled-int4-g128'), like)
  up = params['backbone']['blocks'][0]['mlp']['up'].get_value()
  assert isinstance(up, kernels.QuantizedKernel) and recipe.bits == 4
  values = np.asarray(up.weight.qvalue, np.int8)
  assert values.shape == (32, 32) and values.min() >= -8 and values.max() <= 7


def _float_tree(tensors: dict[str, np.ndarray]):
  """An nnx.State of Params at the '/'-joined paths of `tensors`."""
  from flax import nnx
  return nnx.from_flat_state([(tuple(int(p) if p.isdigit() else p for p in path.split('/')),
                               nnx.Param(value)) for path, value in sorted(tensors.items())])


def test_a_rerun_trains_nothing_and_rewrites_the_same_rows(compress_run):
  trained = compress_run.workdir / 'pruned-distilled'
  before = _tree_digest(trained / 'checkpoints')
  with open(trained / 'metrics.jsonl', encoding='utf-8') as f:
    logged = f.read()
  compress.run(compress_run.config, str(compress_run.workdir))
  assert _tree_digest(trained / 'checkpoints') == before
  with open(trained / 'metrics.jsonl', encoding='utf-8') as f:
    assert f.read() == logged
  after = _rows(compress_run.workdir)
  for name, row in compress_run.rows.items():
    for key in ('accuracy', 'macro_f1', 'params', 'bytes'):
      assert after[name][key] == row[key], (name, key)


def test_a_group_size_the_sliced_widths_cannot_take_fails_before_distillation(compress_run,
                                                                              tmp_path):
  """64 MLP neurons less a quarter leave 48: int4 groups of 32 fit the dense model, not the
  sliced one; the run stops before it trains anything."""
  config = _config(compress_run.start)
  config.source.workdir = str(compress_run.workdir / 'source')
  config.prune.neurons_fraction = 0.25
  config.quant.group_size = 32
  with pytest.raises(ValueError, match=r'config\.quant\.group_size=32 does not divide'):
    compress.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'pruned-distilled')


@pytest.mark.parametrize('fields,message', [
    ({'quant_variants': ('int3',)}, r"config\.quant_variants: 'int3'"),
    ({'quant_variants': ('int8', 'int8-channel')}, r'config\.quant_variants=.* int8 twice'),
    ({'quant.activations': 'int8'}, r"config\.quant\.activations='int8'"),
    ({'prune.neurons_fraction': 1.5}, r'config\.prune\.neurons_fraction=1\.5'),
    ({'prune.heads_fraction': 0.0, 'prune.neurons_fraction': 0.0},
     r'config\.prune\.heads_fraction and neurons_fraction are both 0'),
    ({'distill.mode': 'cached'}, r"config\.distill\.mode='cached'"),
    ({'train.num_steps': 0}, r'config\.train\.num_steps=0'),
])
def test_bad_fields_are_refused_before_anything_is_written(fields, message, tmp_path):
  config = _config('unused')
  for field, value in fields.items():
    section, _, name = field.rpartition('.')
    (config[section] if section else config)[name] = value
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=message) as error:
    compress.run(config, str(workdir))
  assert '\n' not in str(error.value)
  assert not workdir.exists()

"""The `prune` stage end to end (configs/prune.py:tiny on a tiny BERT), and the compressed
storage its variants are written in."""

import json
import types

import numpy as np
import pytest
from flax import nnx

from conftest import load_config, tiny_bert
from llmopt_jax.prune import storage
from llmopt_jax.stages import prune as prune_stage

VARIANTS = ['dense', 'magnitude-global-50', 'magnitude-global-50-recovered', 'wanda-output-50',
            'sparsegpt-2of4', 'magnitude-heads25-mlp50', 'magnitude-heads25-mlp50-recovered',
            'magnitude-layer-imp-50']


def _config(start: str):
  config = load_config('prune', 'tiny')
  config.init.model = config.source.config.init.model = start
  config.test_batches = config.source.config.test_batches = 1
  source = config.source.config
  source.train.update(num_steps=2, eval_every=2)
  source.checkpoint.every_steps = 2
  config.train.update(num_steps=4, eval_every=2)
  config.checkpoint.every_steps = 2
  config.recover = ('magnitude-global', 'magnitude-structured')
  config.variants += ('magnitude-layer-imp',)
  config.prune.rounds = 2
  return config


@pytest.fixture(scope='module')
def prune_run(tmp_path_factory):
  """configs/prune.py:tiny on a tiny BERT: the source fine-tune is trained inside the run."""
  root = tmp_path_factory.mktemp('prune')
  start = tiny_bert(str(root / 'bert'))
  config = _config(start)
  workdir = root / 'run'
  prune_stage.run(config, str(workdir))
  with open(workdir / 'report.json', encoding='utf-8') as f:
    rows = {row['model']: row for row in json.load(f)['rows']}
  return types.SimpleNamespace(config=config, workdir=workdir, rows=rows, start=start)


def _kernels(prune_run, name):
  """{path: array} of the target kernels of variant `name`, read back from its files."""
  row = prune_run.rows[name]
  tensors, _ = _read(prune_run.workdir / row['directory'])
  return {p: v for p, v in tensors.items() if p.split('/')[-1] in ('q', 'k', 'v', 'o', 'up',
                                                                   'down', 'gate')}


def _read(directory):
  from llmopt_jax.quant import storage as quant_storage
  tensors, metadata = quant_storage.load(str(directory))
  out = {}
  for name, record in metadata['sparse'].items():
    out[name] = storage.decode(tensors[name + '.values'], tensors[name + '.bitmask'],
                               tuple(record['shape']))
  out.update({n: t for n, t in tensors.items() if not n.endswith(('.values', '.bitmask'))})
  return out, metadata


def test_report_has_a_row_per_variant_sized_from_its_files(prune_run):
  rows = prune_run.rows
  assert list(rows) == VARIANTS
  dense = rows['dense']
  for name, row in rows.items():
    assert row['bytes'] == storage.weight_bytes(str(prune_run.workdir / row['directory'])), name
    assert 0 <= row['accuracy'] <= 1 and row['latency_ms_b1'] > 0, name
  for name in VARIANTS[1:]:
    if 'heads' not in name:
      assert rows[name]['sparsity'] == 0.5, name
    assert rows[name]['params'] < dense['params'] and rows[name]['bytes'] < dense['bytes']
  text = (prune_run.workdir / 'report.md').read_text()
  assert all(name in text for name in rows)
  with open(prune_run.workdir / 'quality_vs_sparsity.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_each_variant_has_its_granularity_in_the_files(prune_run):
  for name, kernel in _kernels(prune_run, 'wanda-output-50').items():
    rows = kernel.shape[0] if name.split('/')[-1] != 'o' else kernel.shape[0] * kernel.shape[1]
    matrix = kernel.reshape(rows, -1)
    assert ((matrix == 0).sum(axis=0) == rows // 2).all(), name
  for name, kernel in _kernels(prune_run, 'sparsegpt-2of4').items():
    rows = kernel.shape[0] if name.split('/')[-1] != 'o' else kernel.shape[0] * kernel.shape[1]
    groups = kernel.reshape(rows // 4, 4, -1)
    assert ((groups != 0).sum(axis=1) <= 2).all(), name
  kernels = _kernels(prune_run, 'magnitude-global-50')
  zeros = sum(int((k == 0).sum()) for k in kernels.values())
  assert zeros == sum(k.size for k in kernels.values()) // 2


def test_recovery_trains_the_survivors_and_keeps_every_pruned_weight_at_zero(prune_run):
  pruned = _kernels(prune_run, 'magnitude-global-50')
  recovered = _kernels(prune_run, 'magnitude-global-50-recovered')
  moved = False
  for name, kernel in pruned.items():
    assert (recovered[name][kernel == 0] == 0).all(), name
    moved |= not np.array_equal(recovered[name], kernel)
  assert moved, 'the recovery run did not change any kept weight'


def test_structured_pruning_writes_smaller_matrices(prune_run):
  """Half the MLP neurons go: the files hold matrices half as wide, every weight of them
  counted, and the target kernels lose a share equal to the removed MLP weights."""
  dense = _kernels(prune_run, 'dense')
  for name in ('magnitude-heads25-mlp50', 'magnitude-heads25-mlp50-recovered'):
    sliced = _kernels(prune_run, name)
    for path, kernel in dense.items():
      leaf = path.split('/')[-1]
      if leaf in ('up', 'gate'):
        assert sliced[path].shape == (kernel.shape[0], kernel.shape[1] // 2), path
      elif leaf == 'down':
        assert sliced[path].shape == (kernel.shape[0] // 2, kernel.shape[1]), path
    removed = sum(dense[p].size - sliced[p].size for p in dense)
    row = prune_run.rows[name]
    assert row['sparsity'] == pytest.approx(removed / sum(k.size for k in dense.values()))
    assert row['params'] <= prune_run.rows['dense']['params'] - removed


def test_iterative_pruning_trains_a_run_per_round_and_ends_at_the_sparsity(prune_run):
  row = prune_run.rows['magnitude-layer-imp-50']
  assert row['sparsity'] == 0.5 and row['recovered']
  for r in (1, 2):
    assert (prune_run.workdir / f'magnitude-layer-imp-50-round{r}' / 'summary.json').exists()


def test_a_rerun_reuses_the_finished_source_and_recovery(prune_run):
  """Nothing trains twice: the rerun finds the source and the recovery run finished and
  rewrites the same rows (latency aside)."""
  before = prune_run.rows
  prune_stage.run(prune_run.config, str(prune_run.workdir))
  with open(prune_run.workdir / 'report.json', encoding='utf-8') as f:
    after = {row['model']: row for row in json.load(f)['rows']}
  for name, row in before.items():
    for key in ('accuracy', 'macro_f1', 'params', 'bytes', 'sparsity'):
      assert after[name][key] == row[key], (name, key)


@pytest.mark.parametrize('field,value,message', [
    ('variants', ('magnitude',), "config.variants entry 'magnitude'"),
    ('variants', ('obs-layer',), 'config.prune.method'),
    ('variants', ('wanda-2:x',), "config.variants entry 'wanda-2:x'"),
    ('variants', ('magnitude-5:4',), 'config.prune.n=5 > config.prune.m=4'),
    ('sparsities', (1.5,), 'config.sparsities entry 1.5'),
    ('recover', ('wanda-layer',), 'config.recover'),
    ('prune.sparsegpt_damp', -1.0, 'config.prune.sparsegpt_damp'),
])
def test_bad_fields_are_refused_before_anything_is_written(field, value, message, tmp_path):
  config = _config('unused')
  section, _, name = field.rpartition('.')
  (config[section] if section else config)[name] = value
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    prune_stage.run(config, str(workdir))
  assert not workdir.exists()


# ---- Compressed storage ---------------------------------------------------------------------

@pytest.mark.parametrize('dtype', [np.float32, np.float16, np.int8])
@pytest.mark.parametrize('density', [0.0, 0.03, 0.5, 1.0])
def test_sparse_encoding_round_trips_bitwise(dtype, density):
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(37, 53)) * 10).astype(dtype)
  x[rng.random(x.shape) >= density] = 0
  if np.issubdtype(dtype, np.floating):
    x.reshape(-1)[::7] = -0.0  # a value, not a zero, to the encoder: its sign survives
  values, bitmask = storage.encode(x)
  assert bitmask.dtype == np.uint8 and bitmask.size == -(-x.size // 8)
  back = storage.decode(values, bitmask, x.shape)
  assert back.dtype == x.dtype
  np.testing.assert_array_equal(back.view(np.uint8), x.view(np.uint8))


def test_a_params_tree_round_trips_and_only_sparse_kernels_shrink(tmp_path):
  rng = np.random.default_rng(1)
  dense = rng.normal(size=(64, 32)).astype(np.float32)
  sparse = dense * (rng.random(dense.shape) < 0.25)
  params = nnx.State({'a': nnx.Param(dense), 'b': nnx.Param(sparse),
                      'c': nnx.Param(np.zeros((3,), np.float32))})
  size = storage.save(str(tmp_path / 'm'), params, ['a', 'b'], {'variant': 'x'})
  loaded, metadata = storage.load(str(tmp_path / 'm'), params)
  assert set(metadata['sparse']) == {'b'}, 'a dense kernel is stored as it is'
  for (path, want), (_, got) in zip(nnx.to_flat_state(params), nnx.to_flat_state(loaded),
                                    strict=True):
    np.testing.assert_array_equal(got.get_value(), want.get_value(), err_msg=str(path))
  # b: a quarter of its values plus one bit per entry, in place of every value.
  payload = dense.nbytes + np.count_nonzero(sparse) * 4 + sparse.size // 8 + 12
  assert payload <= size < payload + 4096  # + the safetensors header


def test_a_bitmask_that_disagrees_with_its_values_is_refused():
  values, bitmask = storage.encode(np.array([1.0, 0.0, 2.0], np.float32))
  with pytest.raises(ValueError, match='bitmask marks 2 entries but 1 values'):
    storage.decode(values[:1], bitmask, (3,))

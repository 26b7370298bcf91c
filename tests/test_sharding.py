"""Meshes, rules and presets: sharded training equals one device, and the layout is the rules'."""

import math
import sys
import types

import jax
import numpy as np
import optax
import pytest
from absl import flags
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

import tolerances
from conftest import REPO, load_config
from llmopt_jax import configlib, optim, sharding
from llmopt_jax.tasks import lm
from llmopt_jax.train import memory
from llmopt_jax.train import state as state_lib
from llmopt_jax.train import step as step_lib

NUM_STEPS = 3

# Shapes that divide the tiny model (4 heads, 2 kv heads) over the 8 simulated devices.
PRESET_SHAPES = {
    'data': None,          # the preset's own: data=8
    'fsdp': None,          # fsdp=8
    'tensor': {'data': 4, 'fsdp': 1, 'tensor': 2},  # tensor=8 would split 2 kv heads 8 ways
    'fsdp_tensor': None,   # fsdp=4, tensor=2
}


@pytest.fixture(scope='module')
def setup(tfds_dir, tmp_path_factory):
  """The tiny task without dropout, and the same three batches for every mesh."""
  config = load_config('pretrain', 'tiny')
  config.data.tfds_data_dir = tfds_dir
  config.model.dropout_rate = 0.0
  built = lm.pretraining(config, str(tmp_path_factory.mktemp('sharding')))
  task, model_config = built.task, built.card.model
  batches = [next(task.train_data) for _ in range(NUM_STEPS)]
  tx = optim.make_optimizer(optim.OptimConfig.from_config(config.optim), 10)
  graphdef, init = state_lib.init_fn(task.build_model, tx, seed=0)
  # What a step sums: the loss over a batch's tokens, along the forward path (and back).
  tokens = batches[0]['weights'].size
  path = tolerances.forward_terms(model_config, config.data.seq_len)
  lr_sum = sum(float(optim.make_schedule(config.optim, 10)(t)) for t in range(NUM_STEPS))
  return types.SimpleNamespace(task=task, batches=batches, tx=tx, graphdef=graphdef, init=init,
                               tokens=tokens, path=path, lr_sum=lr_sum)


def preset(name, shape=None, devices=None):
  mesh_config = configlib.mesh(name)
  if shape is not None:
    mesh_config.shape = shape
  return sharding.from_config(mesh_config, devices)


def train(setup, mesh, rules):
  """Losses and final parameters (as numpy) after NUM_STEPS steps on `mesh`."""
  _, shardings = state_lib.abstract_and_shardings(setup.init, mesh, rules)
  state = state_lib.initialize(setup.init, shardings)
  train_step = step_lib.make_train_step(setup.graphdef, setup.tx, setup.task.loss_fn, seed=0)
  eval_step = step_lib.make_eval_step(setup.graphdef, setup.task.eval_fn)
  train_step, _ = step_lib.jit_steps(train_step, eval_step, shardings, mesh, rules)
  losses = []
  for batch in setup.batches:
    state, metrics = train_step(state, sharding.shard_batch(batch, mesh, rules), None)
    losses.append(metrics['loss'][0] / metrics['loss'][1])
  return np.asarray(losses), [np.asarray(p) for p in jax.tree.leaves(state.params)]


@pytest.fixture(scope='module')
def single_device(setup):
  return train(setup, *preset('data', devices=jax.devices()[:1]))


@pytest.mark.parametrize('name', sorted(PRESET_SHAPES))
def test_preset_trains_like_one_device(setup, single_device, name):
  mesh, rules = preset(name, PRESET_SHAPES[name])
  assert mesh.size == 8
  losses, params = train(setup, mesh, rules)
  ref_losses, ref_params = single_device
  # Sharded matmuls and reductions add float32 terms in another order; nothing else differs.
  # A loss is a sum of positive terms over the tokens, each through the forward path.
  np.testing.assert_allclose(losses, ref_losses,
                             rtol=tolerances.sum_tolerance(setup.tokens + setup.path, 1.0))
  tolerances.assert_adam_params_close(params, ref_params, setup.lr_sum,
                                      setup.tokens + 2 * setup.path, err_msg=name)


def test_tensor_preset_over_8_devices_names_the_parameter_that_does_not_divide(setup):
  mesh, rules = preset('tensor')
  with pytest.raises(ValueError, match=r"blocks/0/attn/k dim 1 \(kv_heads=2\) does not divide "
                                       r"over mesh axes \('tensor',\) of size 8"):
    state_lib.abstract_and_shardings(setup.init, mesh, rules)


def param_specs(setup, mesh, rules):
  abstract, shardings = state_lib.abstract_and_shardings(setup.init, mesh, rules)
  return abstract, shardings, lambda *path: _get(shardings.params, path).get_value().spec


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_tensor_preset_splits_heads_and_mlp_hidden(setup):
  _, _, spec = param_specs(setup, *preset('tensor', PRESET_SHAPES['tensor']))
  assert spec('blocks', 0, 'mlp', 'up') == P(None, 'tensor')       # [embed, mlp]
  assert spec('blocks', 0, 'mlp', 'down') == P('tensor', None)     # [mlp, embed]
  assert spec('blocks', 0, 'attn', 'q') == P(None, 'tensor', None)  # [embed, heads, kv]
  assert spec('embedding') == P('tensor', None)                     # [vocab, embed]


def test_fsdp_shards_every_large_parameter_and_its_adam_moments(setup):
  abstract, shardings, _ = param_specs(setup, *preset('fsdp'))
  params = jax.tree.leaves(abstract.params)
  for leaf in params:
    if leaf.size > 1024:
      assert not leaf.sharding.is_fully_replicated, leaf
  # Every parameter, norms included, has an `embed` dimension: exactly an eighth per device.
  m = memory.memory(abstract)
  assert m['params_total'] == sum(p.size * 4 for p in params)
  # Byte counts, no float arithmetic; the optimizer state also holds replicated scalars (Adam's
  # step count), which the 3% leave room for.
  assert m['params'] == pytest.approx(m['params_total'] / 8, rel=0.03)
  assert m['opt_state'] == pytest.approx(m['opt_state_total'] / 8, rel=0.03)
  param_shardings = jax.tree.leaves(shardings.params)
  for name in ('mu', 'nu'):
    [(_, moments)] = optax.tree.get_all_with_path(shardings.opt_state, name)
    assert jax.tree.leaves(moments) == param_shardings


def test_memory_report_is_a_table(setup):
  abstract, _, _ = param_specs(setup, *preset('fsdp'))
  compiled = jax.jit(lambda x: x * 2).lower(np.ones(8, np.float32)).compile()
  text = memory.report(abstract, compiled)
  assert 'parameters' in text and 'optimizer state' in text and '1/8' in text
  assert 'temporaries' in text or 'not reported' in text


def test_an_array_claims_each_mesh_axis_once():
  _, rules = sharding.MESH_PRESETS['fsdp']
  assert sharding.logical_to_spec(('batch', 'length', 'embed'), rules) == P(
      ('data', 'fsdp'), None, None)
  assert sharding.logical_to_spec(('embed', 'mlp'), rules) == P('fsdp', None)
  rules = {**rules, 'batch': ('fsdp', 'data')}
  assert sharding.logical_to_spec(('embed', 'batch'), rules) == P('fsdp', 'data')
  with pytest.raises(ValueError, match="logical axis 'expert' has no entry"):
    sharding.logical_to_spec(('expert',), rules)


def test_batch_must_divide_the_batch_mesh_axes():
  mesh, rules = preset('data')
  sharding.check_batch(16, mesh, rules, num_micro_batches=2)
  with pytest.raises(ValueError, match=r"config.train.batch_size=6 does not divide over the "
                                       r"batch mesh axes \('data', 'fsdp'\) of size 8"):
    sharding.check_batch(6, mesh, rules)
  with pytest.raises(ValueError, match=r'a micro-batch of 4 .*num_micro_batches=4'):
    sharding.check_batch(16, mesh, rules, num_micro_batches=4)


@pytest.mark.parametrize('shape, message', [
    ({'data': 3, 'fsdp': -1}, r'config.mesh.shape .* does not divide the 8 devices'),
    ({'data': 4}, r'config.mesh.shape .* needs 4 devices, but 8 are available'),
    ({'data': -1, 'fsdp': -1}, r'config.mesh.shape .* one may be -1'),
    ({'model': 8}, r"config.mesh.shape: unknown mesh axes \['model'\]"),
])
def test_mesh_that_does_not_fit_the_devices_is_named(shape, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(shape)


def test_rules_naming_a_missing_mesh_axis_fail():
  mesh, rules = preset('data')
  with pytest.raises(ValueError, match=r"config.mesh.rules.mlp names mesh axes \['model'\]"):
    sharding.check_rules(mesh, {**rules, 'mlp': ('model',)})


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')  # ml_collections'
def test_command_line_overrides_shape_and_rules_field_by_field(monkeypatch):
  argv = [
      'prog', f'--config={REPO}/configs/pretrain.py:tiny,mesh=fsdp',
      "--config.mesh.shape={'data': 2, 'fsdp': 2, 'tensor': 2}",
      '--config.mesh.rules.mlp=tensor',            # was () in the preset
      "--config.mesh.rules.vocab=('fsdp', 'tensor')",
      '--config.mesh.rules.embed=None',            # was ('fsdp',)
      '--config.mesh.rules.batch=data',            # was ('data', 'fsdp')
  ]
  monkeypatch.setattr(sys, 'argv', argv)  # ml_collections reads the override flags there
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=flag_values, lock_config=True)
  flag_values(argv)
  mesh, rules = sharding.from_config(flag_values.config.mesh)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert rules['mlp'] == ('tensor',) and rules['vocab'] == ('fsdp', 'tensor')
  assert rules['embed'] == () and rules['batch'] == ('data',)
  assert sharding.logical_to_spec(('batch', 'length', 'vocab'), rules) == P(
      'data', None, ('fsdp', 'tensor'))


def test_config_argument_picks_a_preset():
  config = load_config('pretrain', 'tiny,mesh=fsdp_tensor')
  shape, rules = sharding.MESH_PRESETS['fsdp_tensor']
  assert config.mesh.shape.to_dict() == shape and config.mesh.rules.to_dict() == rules
  with pytest.raises(ValueError, match="unknown mesh preset 'zero3'"):
    load_config('pretrain', 'mesh=zero3')


def test_multi_slice_grid_keeps_each_process_a_contiguous_block():
  devices = [types.SimpleNamespace(id=i, process_index=i // 4, platform='cpu', device_kind='cpu')
             for i in range(8)]
  grid = sharding.hybrid_device_grid([4, 2, 1], [2, 1, 1], devices)  # data 4 = 2 slices x 2
  assert grid.shape == (4, 2, 1)
  assert {d.process_index for d in grid[:2].flat} == {0}
  assert {d.process_index for d in grid[2:].flat} == {1}
  with pytest.raises(ValueError, match=r'config.mesh.dcn_shape'):
    sharding.make_mesh({'data': 8}, dcn_shape={'data': 2})  # one process here: one slice
  assert math.prod(sharding.make_mesh({'data': 8}, dcn_shape={'data': 1}).shape.values()) == 8

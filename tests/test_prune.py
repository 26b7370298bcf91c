"""Pruning's core (`llmopt_jax/prune`): exact sparsity per granularity, the gradual schedule's
closed form, and the optimizer wrapper keeping pruned weights and their moments at zero in
the one train step, sharded or not."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances
from flax import nnx

from llmopt_jax import configlib, losses, optim, sharding
from llmopt_jax.models.config import TransformerConfig
from llmopt_jax.models.transformer import Transformer
from llmopt_jax.prune import config as prune_config
from llmopt_jax.prune import imp
from llmopt_jax.prune import masks as masks_lib
from llmopt_jax.prune import optimizer as prune_optimizer
from llmopt_jax.prune import scores
from llmopt_jax.prune.schedule import Gradual
from llmopt_jax.train import state as state_lib
from llmopt_jax.train import step as step_lib

MODEL = TransformerConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4,
                          num_kv_heads=2, head_dim=8, mlp_dim=64)


INNER = optim.OptimConfig(lr=3e-2, warmup_steps=0, weight_decay=0.1)


def build(rngs):
  return Transformer(MODEL, rngs=rngs)


@pytest.fixture(scope='module')
def params():
  return nnx.state(build(nnx.Rngs(params=0)), nnx.Param)


def recipe(**fields):
  return prune_config.PruneConfig(**fields)


def keep_masks(params, cfg):
  chosen = masks_lib.targets(params, cfg)
  return chosen, masks_lib.keep(scores.magnitude(params, chosen), chosen, cfg)


# ---- Exact counts ----------------------------------------------------------------------------

@pytest.mark.parametrize('sparsity', [0.3, 0.5, 0.77])
def test_layer_granularity_prunes_exactly_the_share_of_every_kernel(params, sparsity):
  chosen, kept = keep_masks(params, recipe(sparsity=sparsity))
  assert len(chosen) == 2 * 7  # q k v o gate up down in each of 2 blocks
  for path, mask in kept.items():
    assert mask.shape == chosen[path].shape
    assert int(jnp.sum(~mask)) == round(sparsity * mask.size), path


def test_global_granularity_prunes_exactly_the_share_overall_and_lowest_first(params):
  cfg = recipe(sparsity=0.6, granularity='global')
  _, kept = keep_masks(params, cfg)
  total = sum(m.size for m in kept.values())
  assert sum(int(jnp.sum(~m)) for m in kept.values()) == round(0.6 * total)
  flat = dict(nnx.to_flat_state(params))
  pruned = np.concatenate([np.abs(flat[p].get_value())[~m] for p, m in kept.items()])
  survivors = np.concatenate([np.abs(flat[p].get_value())[m] for p, m in kept.items()])
  assert pruned.max() <= survivors.min()
  shares = {int(jnp.mean(~m) * 100) for m in kept.values()}
  assert len(shares) > 1, 'one threshold over all layers gives layers different sparsities'


def test_output_granularity_prunes_exactly_the_share_of_every_output_channel(params):
  cfg = recipe(sparsity=0.5, granularity='output')
  chosen, kept = keep_masks(params, cfg)
  for path, mask in kept.items():
    rows, _ = chosen[path].matrix
    pruned_per_column = np.sum(~np.asarray(chosen[path].as_matrix(mask)), axis=0)
    assert (pruned_per_column == round(0.5 * rows)).all(), path


@pytest.mark.parametrize('n,m', [(2, 4), (4, 8), (1, 4)])
def test_n_of_m_keeps_exactly_n_in_every_group_of_m_inputs(params, n, m):
  chosen, kept = keep_masks(params, recipe(granularity='nm', n=n, m=m))
  for path, mask in kept.items():
    rows, columns = chosen[path].matrix
    groups = np.asarray(chosen[path].as_matrix(mask)).reshape(rows // m, m, columns)
    assert (groups.sum(axis=1) == n).all(), path


def test_ties_do_not_change_the_count(params):
  cfg = recipe(sparsity=0.5)
  chosen = masks_lib.targets(params, cfg)
  flat_scores = {p: jnp.ones(t.shape) for p, t in chosen.items()}
  for mask in masks_lib.keep(flat_scores, chosen, cfg).values():
    assert int(jnp.sum(~mask)) == round(0.5 * mask.size)


def test_apply_zeroes_exactly_the_pruned_weights(params):
  cfg = recipe(sparsity=0.5)
  chosen, kept = keep_masks(params, cfg)
  pruned = masks_lib.apply(params, kept)
  zeros, total = masks_lib.counts(pruned, chosen)
  assert zeros == sum(round(0.5 * m.size) for m in kept.values()) and total == sum(
      m.size for m in kept.values())
  before, after = dict(nnx.to_flat_state(params)), dict(nnx.to_flat_state(pruned))
  for path, var in before.items():
    want = np.where(kept[path], var.get_value(), 0) if path in kept else var.get_value()
    np.testing.assert_array_equal(after[path].get_value(), want)


# ---- Schedule ---------------------------------------------------------------------------------

def test_gradual_schedule_follows_the_cubic_closed_form():
  schedule = Gradual(initial=0.1, final=0.8, start=10, end=50, every=10)
  for step in [0, 9, 10, 15, 20, 29, 30, 40, 50, 51, 400]:
    if step < 10:
      want = 0.0
    else:
      held = min(10 + 10 * ((step - 10) // 10), 50)
      want = 0.8 + (0.1 - 0.8) * (1 - (held - 10) / 40) ** 3
    assert float(schedule.sparsity(step)) == pytest.approx(want, rel=1e-6), step
  updates = [s for s in range(60) if bool(schedule.updates_at(s))]
  assert updates == [10, 20, 30, 40, 50]


def test_gradual_schedule_reaches_the_final_sparsity_at_its_end_step():
  schedule = Gradual(initial=0.0, final=0.5, start=3, end=10, every=4)  # 4 does not divide 7
  assert [s for s in range(15) if bool(schedule.updates_at(s))] == [3, 7, 10]
  assert float(schedule.sparsity(10)) == pytest.approx(0.5)


# ---- The optimizer wrapper in the train step ------------------------------------------------

def _batch(seed, batch=8, length=16):
  tokens = np.random.default_rng(seed).integers(0, MODEL.vocab_size, (batch, length + 1))
  return {'inputs': tokens[:, :-1].astype(np.int32), 'targets': tokens[:, 1:].astype(np.int32),
          'weights': np.ones((batch, length), np.float32)}


def _run(cfg, steps, mesh_preset=None, start_masks=None):
  """`steps` train steps of the tiny model under the pruning wrapper; returns the states."""
  chosen = masks_lib.targets(nnx.state(build(nnx.Rngs(params=0)), nnx.Param), cfg)
  inner = optim.make_optimizer(INNER, steps)
  tx = prune_optimizer.wrap(inner, cfg, chosen)

  def extend(params):
    masks = start_masks(params, chosen) if start_masks else {
        p: jnp.ones(t.shape, bool) for p, t in chosen.items()}
    return masks_lib.with_masks(params, masks)
  graphdef, init = state_lib.init_fn(build, tx, seed=0, extend_params=extend)
  train_step = step_lib.make_train_step(graphdef, tx, losses.lm_loss, seed=0,
                                        params_transform=prune_optimizer.params_transform(cfg))
  if mesh_preset is None:
    state, step = jax.jit(init)(), jax.jit(train_step)
  else:
    mesh, rules = sharding.from_config(configlib.mesh(mesh_preset))
    _, shardings = state_lib.abstract_and_shardings(init, mesh, rules)
    state = state_lib.initialize(init, shardings)
    step, _ = step_lib.jit_steps(train_step, lambda p, b: {}, shardings, mesh, rules)
  history = []
  for i in range(steps):
    batch = _batch(i)
    if mesh_preset is not None:
      batch = sharding.shard_batch(batch, mesh, rules)
      state, _ = step(state, batch, None)
    else:
      state, _ = step(state, batch)
    history.append(jax.device_get(state))
  return chosen, history


def _moments(opt_state, path):
  """The AdamW first and second moments of kernel `path` in the wrapper's state."""
  name = masks_lib.path_name(path) + '/value'
  found = [leaf for p, leaf in jax.tree_util.tree_leaves_with_path(opt_state.inner)
           if optim.param_path(p).endswith(name)]
  assert len(found) == 2, name
  return found


def _check_zero_where_pruned(chosen, state):
  params, masks = masks_lib.split(state.params)
  flat = dict(nnx.to_flat_state(params))
  for path in chosen:
    pruned = ~np.asarray(masks[path]).astype(bool)
    assert pruned.any()
    assert (np.asarray(flat[path].get_value())[pruned] == 0).all(), path
    for moment in _moments(state.opt_state, path):
      assert (np.asarray(moment)[pruned] == 0).all(), path


def test_one_shot_masks_hold_weights_and_moments_at_zero_through_training():
  cfg = recipe(sparsity=0.5)
  start = lambda params, chosen: masks_lib.keep(scores.magnitude(params, chosen), chosen, cfg)
  chosen, history = _run(cfg, 5, start_masks=start)
  first_masks = masks_lib.split(history[0].params)[1]
  for state in history:
    _check_zero_where_pruned(chosen, state)
    for path, mask in masks_lib.split(state.params)[1].items():
      np.testing.assert_array_equal(mask, first_masks[path])
  # The kept weights did train.
  before = dict(nnx.to_flat_state(masks_lib.split(history[0].params)[0]))
  after = dict(nnx.to_flat_state(masks_lib.split(history[-1].params)[0]))
  path = next(iter(chosen))
  assert not np.array_equal(before[path].get_value(), after[path].get_value())


def test_gradual_pruning_reaches_each_scheduled_sparsity_and_zeroes_new_moments():
  cfg = recipe(sparsity=0.6, schedule='gradual', start_step=1, end_step=5, every_steps=2,
               initial_sparsity=0.2)
  chosen, history = _run(cfg, 7)
  schedule = Gradual.of(cfg)
  for count, state in enumerate(history):
    # State after update count + 1: masks at s(latest update step <= count).
    updated = [s for s in range(count + 1) if bool(schedule.updates_at(s))]
    want = float(schedule.sparsity(updated[-1])) if updated else 0.0
    _, masks = masks_lib.split(state.params)
    for path, mask in masks.items():
      assert int(np.sum(np.asarray(mask) == 0)) == round(want * mask.size), (count, path)
    if updated:
      _check_zero_where_pruned(chosen, state)


def test_straight_through_keeps_pruned_weights_training_but_out_of_the_forward_pass():
  cfg = recipe(sparsity=0.5, ste=True)
  start = lambda params, chosen: masks_lib.keep(scores.magnitude(params, chosen), chosen, cfg)
  chosen, history = _run(cfg, 3, start_masks=start)
  params, masks = masks_lib.split(history[-1].params)
  flat = dict(nnx.to_flat_state(params))
  path = next(iter(chosen))
  pruned = ~np.asarray(masks[path]).astype(bool)
  assert (np.asarray(flat[path].get_value())[pruned] != 0).any()
  seen = prune_optimizer.params_transform(cfg)(history[-1].params, None)
  assert (np.asarray(dict(nnx.to_flat_state(seen))[path].get_value())[pruned] == 0).all()


def test_sharded_pruning_equals_single_device():
  """Gradual magnitude pruning on the 8 simulated devices (4-way FSDP x 2-way tensor) against
  one device: the same exact sparsity everywhere, the same masks but for weights that float32
  reassociation moved across the threshold, and the same weights to Adam's rounding bound."""
  cfg = recipe(sparsity=0.5, schedule='gradual', start_step=0, end_step=2, every_steps=1)
  steps = 3
  _, single = _run(cfg, steps)
  _, sharded = _run(cfg, steps, mesh_preset='fsdp_tensor')
  (one, one_masks), (many, many_masks) = (masks_lib.split(single[-1].params),
                                          masks_lib.split(sharded[-1].params))
  agree = {}
  for path, mask in one_masks.items():
    assert np.sum(many_masks[path] == 0) == np.sum(mask == 0) == round(0.5 * mask.size)
    agree[path] = np.asarray(mask) == np.asarray(many_masks[path])
    assert agree[path].mean() >= 0.999, path
  flat_one, flat_many = dict(nnx.to_flat_state(one)), dict(nnx.to_flat_state(many))
  got, want = [], []
  for path, var in flat_one.items():
    where = agree.get(path, True)
    got.append(np.where(where, flat_many[path].get_value(), 0))
    want.append(np.where(where, var.get_value(), 0))
  schedule = optim.make_schedule(INNER, steps)
  lr_sum = sum(float(schedule(t)) for t in range(steps))
  tokens = 8 * 16
  tolerances.assert_adam_params_close(got, want, lr_sum,
                                      tokens + 2 * tolerances.forward_terms(MODEL, 16))


# ---- Bad recipes --------------------------------------------------------------------------------

@pytest.mark.parametrize('fields,message', [
    ({'sparsity': 1.0}, 'config.prune.sparsity=1.0'),
    ({'sparsity': -0.1}, 'config.prune.sparsity=-0.1'),
    ({'granularity': 'nm', 'n': 5, 'm': 4}, 'config.prune.n=5 > config.prune.m=4'),
    ({'method': 'obs'}, 'config.prune.method'),
    ({'granularity': 'row'}, 'config.prune.granularity'),
    ({'method': 'sparsegpt', 'granularity': 'global'}, 'config.prune.granularity'),
    ({'schedule': 'gradual', 'end_step': 0}, 'config.prune.end_step=0'),
    ({'schedule': 'gradual', 'end_step': 9, 'method': 'wanda'}, 'config.prune.method'),
    ({'targets': ('(',)}, 'config.prune.targets'),
])
def test_bad_recipes_are_refused_naming_the_field(fields, message):
  with pytest.raises(ValueError, match=message.replace('.', r'\.').replace('(', r'\(')):
    recipe(**fields)


def test_patterns_matching_nothing_are_refused(params):
  with pytest.raises(ValueError, match='config.prune.targets'):
    masks_lib.targets(params, recipe(targets=('.*nothing',)))


def test_n_of_m_that_does_not_tile_a_kernel_is_refused(params):
  with pytest.raises(ValueError, match='config.prune.m=3'):
    masks_lib.targets(params, recipe(granularity='nm', n=1, m=3))


# ---- Iterative pruning with rewinding -----------------------------------------------------------

def test_iterative_rounds_prune_the_same_share_of_survivors_and_end_at_the_target():
  cfg = recipe(sparsity=0.784, schedule='iterative', granularity='global', rounds=3)
  sparsities = [0.0] + [imp.round_sparsity(cfg, r) for r in (1, 2, 3)]
  assert sparsities[-1] == pytest.approx(0.784)
  kept_shares = [(1 - b) / (1 - a) for a, b in itertools.pairwise(sparsities)]
  assert kept_shares == pytest.approx([0.6] * 3)


def test_rewinding_restores_the_survivors_exactly_and_only_prunes_more(params):
  """Round 2 from a 'trained' copy of round 1: the masks come from the trained magnitudes,
  include every weight round 1 pruned, and the survivors hold the rewind point's values bit
  for bit."""
  cfg = recipe(sparsity=0.75, schedule='iterative', granularity='global', rounds=2)
  chosen = masks_lib.targets(params, cfg)
  start, first = imp.rewind(params, params, chosen, cfg, imp.round_sparsity(cfg, 1))
  noise = jax.tree.map(lambda x: x * 0.5 + 0.01, start)  # stands in for a round of training
  trained = masks_lib.apply(noise, first)
  rewound, second = imp.rewind(params, trained, chosen, cfg, imp.round_sparsity(cfg, 2))
  source, after = dict(nnx.to_flat_state(params)), dict(nnx.to_flat_state(rewound))
  total = sum(m.size for m in second.values())
  assert sum(int(jnp.sum(~m)) for m in second.values()) == round(0.75 * total)
  for path, mask in second.items():
    assert not np.any(np.asarray(mask) & ~np.asarray(first[path])), path
    np.testing.assert_array_equal(
        np.asarray(after[path].get_value()),
        np.where(mask, np.asarray(source[path].get_value()), 0))


# ---- In the loop: checkpointed masks, exact resume ---------------------------------------------

def _pruning_pretrain(tfds_dir, workdir, cfg, wrap_data=None):
  """configs/pretrain.py:tiny for 8 steps on the 4 x 2 FSDP x tensor mesh, under the pruning
  wrapper with masks in the trained tree; returns the last checkpoint's state."""
  import dataclasses

  import orbax.checkpoint as ocp

  from conftest import load_config
  from llmopt_jax.tasks import lm
  from llmopt_jax.train import loop
  from llmopt_jax.train.config import TrainConfig
  config = load_config('pretrain', 'tiny')
  config.data.tfds_data_dir = tfds_dir
  config.train.update(num_steps=8, eval_every=4, log_every=2)
  config.checkpoint.every_steps = 1
  config.mesh = configlib.mesh('fsdp_tensor')
  task = lm.pretraining(config, str(workdir)).task
  abstract = nnx.state(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))), nnx.Param)
  chosen = masks_lib.targets(abstract, cfg)
  ones = lambda params: {p: jnp.ones(t.shape, bool) for p, t in chosen.items()}
  task = dataclasses.replace(
      task, extend_params=lambda params: masks_lib.with_masks(params, ones(params)),
      params_transform=prune_optimizer.params_transform(cfg),
      wrap_optimizer=lambda tx: prune_optimizer.wrap(tx, cfg, chosen),
      train_data=task.train_data if wrap_data is None else wrap_data(task.train_data))
  loop.train(TrainConfig.from_config(config), str(workdir), task)
  return ocp.StandardCheckpointer().restore(workdir / 'checkpoints' / '8' / 'state'), chosen


def test_a_resumed_pruning_run_is_bitwise_equal_to_an_uninterrupted_one(tfds_dir, tmp_path):
  """Gradual pruning interrupted after step 5 (masks recomputed at steps 1, 3 and 5) and
  resumed: masks, weights and moments come back from the checkpoint exactly, so the run ends
  bit for bit where the uninterrupted one does, at the final sparsity, pruned weights at 0."""
  from test_train import Interrupt
  cfg = recipe(sparsity=0.5, schedule='gradual', start_step=1, end_step=5, every_steps=2)
  straight, chosen = _pruning_pretrain(tfds_dir, tmp_path / 'straight', cfg)
  with pytest.raises(KeyboardInterrupt):
    _pruning_pretrain(tfds_dir, tmp_path / 'resumed', cfg, lambda d: Interrupt(d, 5))
  resumed, _ = _pruning_pretrain(tfds_dir, tmp_path / 'resumed', cfg)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  arrays = {optim.param_path(path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(resumed['params'])}
  for path in chosen:
    name = masks_lib.path_name(path)
    w = np.asarray(arrays[f'{masks_lib.BASE}/{name}/value'])
    m = np.asarray(arrays[f'{masks_lib.MASK}/{name}/value'])
    assert np.sum(m == 0) == round(0.5 * m.size), path
    assert (w[m == 0] == 0).all(), path

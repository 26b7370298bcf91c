"""The training loop: learning, early stopping, the NaN guard, accumulation, exact resume."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

import tolerances
from conftest import load_config
from llmopt_jax import configlib, optim, sharding
from llmopt_jax.stages import pretrain
from llmopt_jax.tasks import lm
from llmopt_jax.train import loop
from llmopt_jax.train import state as state_lib
from llmopt_jax.train import step as step_lib
from llmopt_jax.train.checkpoint import Checkpoints
from llmopt_jax.train.config import TrainConfig


def tiny_config(tfds_dir, **train):
  config = load_config('pretrain', 'tiny')
  config.data.tfds_data_dir = tfds_dir
  config.train.update(train)
  return config


def run(config, workdir, wrap_data=None):
  task = lm.pretraining(config, str(workdir)).task
  if wrap_data is not None:
    task = dataclasses.replace(task, train_data=wrap_data(task.train_data))
  return loop.train(TrainConfig.from_config(config), str(workdir), task)


def final_params(workdir, step):
  restored = Checkpoints(
      str(workdir / 'checkpoints'), keep_last=10, keep_best=0, best_metric='eval/loss',
      best_mode='min').restore_progress(step)
  del restored
  import orbax.checkpoint as ocp
  state = ocp.StandardCheckpointer().restore(workdir / 'checkpoints' / str(step) / 'state')
  return jax.tree.leaves(state['params'])


class Interrupt:
  """Wraps a data iterator and raises after `limit` batches, like a kill between steps."""

  def __init__(self, inner, limit):
    self.inner, self.limit, self.served = inner, limit, 0

  def __next__(self):
    if self.served == self.limit:
      raise KeyboardInterrupt('simulated interruption')
    self.served += 1
    return next(self.inner)

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


class Poison(Interrupt):
  """Serves a batch whose weights are NaN as batch number `limit + 1`."""

  def __next__(self):
    self.served += 1
    batch = next(self.inner)
    if self.served == self.limit + 1:
      batch = {**batch, 'weights': np.full_like(batch['weights'], np.nan)}
    return batch


def test_loss_falls_when_overfitting_one_batch(tfds_dir, tmp_path):
  config = tiny_config(tfds_dir)
  config.model.dropout_rate = 0.0
  config.optim.update(lr=1e-2, warmup_steps=0, schedule='constant')
  task = lm.pretraining(config, str(tmp_path)).task
  tx = optim.make_optimizer(optim.OptimConfig.from_config(config.optim), 40)
  graphdef, init = state_lib.init_fn(task.build_model, tx, seed=0)
  state = jax.jit(init)()
  step = jax.jit(step_lib.make_train_step(graphdef, tx, task.loss_fn, seed=0))
  batch = next(task.train_data)
  losses = []
  for _ in range(40):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss'][0] / metrics['loss'][1]))
  assert losses[-1] < 0.5 * losses[0], losses


def test_accumulation_matches_one_big_batch(tfds_dir, tmp_path):
  """k micro-batches give the gradient of the one big batch. With SGD at learning rate 1 a
  step moves every parameter by minus its gradient, so the parameters compare the gradients
  themselves: Adam's direction g / (|g| + eps) would hide a gradient scaled wrongly, and turn
  one that is zero up to rounding into a whole step either way."""
  config = tiny_config(tfds_dir)
  config.model.dropout_rate = 0.0
  built = lm.pretraining(config, str(tmp_path))
  task, model_config = built.task, built.card.model
  tx = optax.sgd(1.0)
  graphdef, init = state_lib.init_fn(task.build_model, tx, seed=0)
  batch = next(task.train_data)
  start = [np.asarray(p) for p in jax.tree.leaves(jax.jit(init)().params)]
  results = []
  for k in (1, 4):
    step = jax.jit(step_lib.make_train_step(graphdef, tx, task.loss_fn, seed=0,
                                            num_micro_batches=k))
    state, metrics = step(jax.jit(init)(), batch)
    results.append(([np.asarray(p) for p in jax.tree.leaves(state.params)], metrics['loss']))
  (p1, l1), (p4, l4) = results
  # The two differ in the order of their float32 sums: the sum over the batch's tokens that
  # the micro-batches split, and the forward and backward passes' own sums, whose matmuls
  # see a batch 4 times smaller.
  tokens = batch['weights'].size
  path = tolerances.forward_terms(model_config, config.data.seq_len)
  # The loss is a sum of positive terms: its own size is sum|terms|.
  np.testing.assert_allclose(l4[0] / l4[1], l1[0] / l1[1],
                             rtol=tolerances.sum_tolerance(tokens + path, 1.0))
  # The gradients' sums (forward, backward, tokens), and each side's rounding of p - g: half
  # an ulp of p.
  bounds = tolerances.gradient_tolerances([a - p0 for p0, a in zip(start, p1)], tokens + 2 * path)
  for p0, a, b, bound in zip(start, p1, p4, bounds, strict=True):
    np.testing.assert_allclose(b, a, rtol=0, atol=bound + tolerances.EPS32 * np.max(np.abs(p0)))


def test_early_stopping_on_a_plateau_keeps_the_best(tfds_dir, tmp_path):
  config = tiny_config(tfds_dir, num_steps=30, eval_every=3)
  config.optim.update(lr=0.0, warmup_steps=0, schedule='constant')  # the loss cannot move
  config.early_stopping.update(patience=2, min_delta=1e-3)
  config.checkpoint.update(every_steps=100, keep_last=1, keep_best=1)
  summary = run(config, tmp_path)
  assert summary['early_stopped']
  assert summary['final_step'] == 9           # evals at 3 (best), 6 and 9 (two without gain)
  assert summary['best_step'] == 3
  assert 3 in summary['checkpoint_steps']     # the best is kept beside the latest
  assert (tmp_path / 'checkpoints' / '3').is_dir()
  again = run(config, tmp_path)              # a rerun sees the finished run and does nothing
  assert again['final_step'] == 9 and again['best_step'] == 3


def test_nan_stops_with_the_step_named_and_keeps_the_last_checkpoint(tfds_dir, tmp_path):
  config = tiny_config(tfds_dir, num_steps=10, eval_every=100, log_every=100)
  config.checkpoint.every_steps = 3
  with pytest.raises(loop.NonFiniteError, match=r'step 5\b.*step 3'):
    run(config, tmp_path, wrap_data=lambda data: Poison(data, 4))
  checkpoints = Checkpoints(str(tmp_path / 'checkpoints'), keep_last=2, keep_best=0,
                            best_metric='eval/loss', best_mode='min')
  assert checkpoints.latest_step() == 3
  assert all(np.isfinite(p).all() for p in final_params(tmp_path, 3))


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tfds_dir, tmp_path):
  config = tiny_config(tfds_dir, num_steps=8, eval_every=4, log_every=2)
  config.mesh = configlib.mesh('fsdp_tensor')  # sharded state on 8 devices
  config.checkpoint.every_steps = 1
  config.model.dropout_rate = 0.1  # the dropout key must be restored too
  run(config, tmp_path / 'straight')
  with pytest.raises(KeyboardInterrupt):
    run(config, tmp_path / 'resumed', wrap_data=lambda data: Interrupt(data, 5))
  summary = run(config, tmp_path / 'resumed')
  assert summary['final_step'] == 8
  # The same program on the same batches, keys and (restored, bitwise) state: bit for bit.
  for a, b in zip(final_params(tmp_path / 'straight', 8), final_params(tmp_path / 'resumed', 8)):
    np.testing.assert_array_equal(a, b)


def test_state_is_born_with_the_rules_shardings(tfds_dir, tmp_path):
  config = tiny_config(tfds_dir)
  task = lm.pretraining(config, str(tmp_path)).task
  tx = optim.make_optimizer(optim.OptimConfig.from_config(config.optim), 10)
  _, init = state_lib.init_fn(task.build_model, tx, seed=0)
  mesh = sharding.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1})
  rules = dict(config.mesh.rules)
  rules['mlp'] = 'data'  # split the MLP hidden axis 8 ways to see the rule take effect
  abstract, shardings = state_lib.abstract_and_shardings(init, mesh, rules)
  state = state_lib.initialize(init, shardings)
  up = state.params['blocks'][0]['mlp']['up'].get_value()
  assert up.sharding.spec == jax.sharding.PartitionSpec(None, 'data')
  assert up.addressable_shards[0].data.shape == (up.shape[0], up.shape[1] // 8)
  mu = state.opt_state[1][0].mu['blocks'][0]['mlp']['up'].get_value()
  assert mu.sharding.spec == up.sharding.spec   # Adam's moments follow their parameter


@pytest.mark.parametrize('field, value, message', [
    ('train.num_steps', 0, r'config\.train\.num_steps=0 must be an int >= 1'),
    ('train.log_every', 0, r'config\.train\.log_every=0'),
    ('train.eval_every', 0, r'config\.train\.eval_every=0'),
    ('train.num_micro_batches', 3, r'config\.train\.batch_size=8 does not divide'),
    ('checkpoint.every_steps', 0, r'config\.checkpoint\.every_steps=0'),
    ('optim.lr', -1e-3, r'config\.optim\.lr=-0\.001'),
    ('optim.lr', float('nan'), r'config\.optim\.lr=nan'),
    ('optim.warmup_steps', 7, r'config\.optim\.warmup_steps=7 must lie in \[0, 6\]'),
    ('optim.b2', 1.0, r'config\.optim\.b2=1\.0'),
    ('early_stopping.mode', 'up', r"config\.early_stopping\.mode='up'"),
])
def test_bad_training_field_is_refused_before_any_work(field, value, message, tfds_dir,
                                                       tmp_path):
  """`TrainConfig` checks every training field once, naming it; the stage fails before it
  reads data or writes a checkpoint."""
  config = tiny_config(tfds_dir)
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(ValueError, match=message) as error:
    TrainConfig.from_config(config)
  assert '\n' not in str(error.value)
  with pytest.raises(ValueError, match=message):
    pretrain.run(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()

"""The optimizer against its closed forms: AdamW with a decay mask, schedules, accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tolerances
from llmopt_jax import configlib, optim


def _params():
  key = jax.random.key(0)
  k1, k2, k3 = jax.random.split(key, 3)
  return nnx.State({
      'dense': {'kernel': nnx.Param(jax.random.normal(k1, (4, 3)))},
      'norm': {'scale': nnx.Param(1.0 + jax.random.normal(k2, (3,)))},
      'embed': {'embedding': nnx.Param(jax.random.normal(k3, (5, 3)))},
  })


def _config(**overrides):
  config = configlib.optimizer(lr=0.1, warmup_steps=0)
  config.schedule = 'constant'
  config.clip_norm = 0.0
  config.update(overrides)
  return optim.OptimConfig.from_config(config)


@pytest.mark.parametrize('decay_embeddings', [False, True])
def test_one_adamw_step_matches_closed_form(decay_embeddings):
  config = _config(decay_embeddings=decay_embeddings, weight_decay=0.3)
  tx = optim.make_optimizer(config, total_steps=10)
  params = _params()
  grads = jax.tree.map(lambda p: jnp.sin(3.0 * p) + 0.5, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax_apply(params, updates)

  # After one step the bias-corrected moments are g and g^2, so Adam's direction is
  # g / (|g| + eps); decoupled decay adds wd * w for the masked-in parameters only.
  def expected(p, g, decays):
    return p - config.lr * (g / (jnp.abs(g) + config.eps) + (config.weight_decay * p if decays
                                                                 else 0.0))
  flat_p, flat_g, flat_new = (nnx.to_flat_state(t) for t in (params, grads, new))
  for (path, p), (_, g), (_, n) in zip(flat_p, flat_g, flat_new):
    name = path[-1]
    decays = name == 'kernel' or (name == 'embedding' and decay_embeddings)
    # Elementwise on both sides: about a dozen correctly rounded operations (the moments, the
    # bias corrections with their inexact 1 - b1 and 1 - b2, sqrt, the division, the decay,
    # p + u), each half an ulp of a value at most |p| + lr: 8 eps32 of that.
    p_value = p.get_value()
    tolerances.assert_close(n.get_value(), expected(p_value, g.get_value(), decays),
                            8 * tolerances.EPS32 * (np.abs(p_value) + config.lr), err_msg=name)


def optax_apply(params, updates):
  return jax.tree.map(lambda p, u: p + u, params, updates)


def test_decay_mask_by_name():
  mask = nnx.to_flat_state(optim.decay_mask(_params(), decay_embeddings=False))
  assert {path[-1]: bool(m) for path, m in mask} == {
      'kernel': True, 'scale': False, 'embedding': False}


def test_clipping_rescales_to_the_global_norm():
  config = _config(clip_norm=0.5, weight_decay=0.0, b1=0.0, b2=0.0, eps=0.0)
  params = _params()
  grads = jax.tree.map(lambda p: 10.0 * jnp.ones_like(p), params)
  clipped_tx = optim.make_optimizer(config, total_steps=10)
  plain_tx = optim.make_optimizer(_config(weight_decay=0.0, b1=0.0, b2=0.0, eps=0.0), 10)
  norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))
  scaled = jax.tree.map(lambda g: g * 0.5 / norm, grads)
  a, _ = clipped_tx.update(grads, clipped_tx.init(params), params)
  b, _ = plain_tx.update(scaled, plain_tx.init(params), params)
  # The norm is a sum of squares of every entry (float32 in optax, then a float here), then a
  # few elementwise roundings on each side.
  entries = sum(g.size for g in jax.tree.leaves(grads))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=tolerances.sum_tolerance(entries + 4, 1.0))


@pytest.mark.parametrize('kind', ['cosine', 'linear'])
def test_schedule_values(kind):
  config = _config(schedule=kind, warmup_steps=10, end_lr_factor=0.1, lr=2.0)
  schedule = optim.make_schedule(config, total_steps=110)
  # Float32 schedules: a handful of roundings (a fraction, a cosine good to an ulp or two,
  # a blend), each relative to the value: 8 eps32 of it. At 0 the warmup is exactly 0 * lr.
  rtol = 8 * tolerances.EPS32
  np.testing.assert_allclose(schedule(0), 0.0, atol=0)
  np.testing.assert_allclose(schedule(5), 1.0, rtol=rtol)          # half-way up the warmup
  np.testing.assert_allclose(schedule(10), 2.0, rtol=rtol)         # peak
  np.testing.assert_allclose(schedule(60), 2.0 * 0.55, rtol=rtol)  # half-way down: (1+0.1)/2
  np.testing.assert_allclose(schedule(110), 0.2, rtol=rtol)        # end: lr * end_lr_factor
  if kind == 'cosine':  # a quarter of the way down the cosine: (1 + cos(pi/4)) / 2 blend
    frac = 0.5 * (1 + np.cos(np.pi / 4))
    np.testing.assert_allclose(schedule(35), 2.0 * (0.1 + 0.9 * frac), rtol=rtol)


def test_bad_schedule_names_the_field():
  with pytest.raises(ValueError, match='config.optim.schedule'):
    optim.make_schedule(_config(schedule='exp'), 10)
  with pytest.raises(ValueError, match='config.optim.warmup_steps'):
    optim.make_schedule(_config(warmup_steps=20), 10)


def test_accumulated_gradient_equals_one_big_batch():
  """Micro-batches with different token counts still give the big batch's gradient."""
  params = {'w': jnp.arange(3.0)}
  x = jax.random.normal(jax.random.key(1), (8, 3))
  weights = jnp.array([1, 0, 1, 1, 0, 0, 1, 1], jnp.float32)  # uneven across micro-batches

  def loss_and_grad(p, batch, rng):
    def f(p):
      per_example = (batch['x'] @ p['w'] - 1.0) ** 2
      loss_sum = jnp.sum(per_example * batch['w'])
      weight = jnp.sum(batch['w'])
      return loss_sum, (weight, {'loss': (loss_sum, weight)})
    return jax.value_and_grad(f, has_aux=True)(p)

  batch = {'x': x, 'w': weights}
  big, big_weight, _ = optim.accumulate_gradients(loss_and_grad, params, batch, None, 1)
  for k in (2, 4):
    acc, weight, sums = optim.accumulate_gradients(
        loss_and_grad, params, batch, jax.random.key(0), k)
    assert float(weight) == float(big_weight) == 5.0  # whole numbers: exact
    # The eight examples' terms 2 (x.w - 1) x / 5 added in another grouping, each residual a
    # 3-term dot less 1: sums of at most 8 + 4 terms, |x| (|x|.|w| + 1) bounding their size.
    ax, aw = np.abs(np.asarray(x, np.float64)), np.abs(np.asarray(params['w'], np.float64))
    magnitude = 2 * ax.T @ ((ax @ aw + 1.0) * np.asarray(weights)) / 5.0
    tolerances.assert_close(acc['w'] / weight, big['w'] / big_weight,
                            tolerances.sum_tolerance(8 + 4, magnitude))
    np.testing.assert_allclose(sums['loss'][1], 5.0, rtol=0, atol=0)


def _layered_params():
  keys = iter(jax.random.split(jax.random.key(0), 6))
  param = lambda shape: nnx.Param(jax.random.normal(next(keys), shape))
  return nnx.State({
      'embedding': param((5, 3)),
      'blocks': {i: {'mlp': {'up': param((3, 4))}} for i in range(3)},
      'final_norm': {'scale': param((3,))},
      'head': {'kernel': param((3, 2))},
  })


@pytest.mark.parametrize('freeze', [(), ('blocks/2/.*',)])
def test_layer_decay_scales_the_first_adam_step(freeze):
  """Adam's first step is lr * g / (|g| + eps); layer i of L gets it times decay^(L - i)."""
  decay = 0.5
  config = _config(layer_decay=decay, weight_decay=0.0, freeze=freeze)
  tx = optim.make_optimizer(config, total_steps=10)
  params = _layered_params()
  grads = jax.tree.map(lambda p: jnp.sin(3.0 * p) + 0.5, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  num_layers = 3
  scales = {'embedding': decay ** (num_layers + 1), 'final_norm/scale': 1.0, 'head/kernel': 1.0}
  scales.update({f'blocks/{i}/mlp/up': decay ** (num_layers - i) for i in range(num_layers)})
  if freeze:  # a frozen block gets nothing, and still counts towards L for the others
    scales['blocks/2/mlp/up'] = 0.0
  flat_g, flat_u = nnx.to_flat_state(grads), nnx.to_flat_state(updates)
  for (path, g), (_, u) in zip(flat_g, flat_u):
    g = g.get_value()
    expected = -config.lr * scales[optim.param_path(path)] * g / (jnp.abs(g) + config.eps)
    # Elementwise on both sides, as in test_one_adamw_step_matches_closed_form: 8 eps32 of
    # the update (at most lr); a frozen block's 0 is exact.
    np.testing.assert_allclose(u.get_value(), expected, rtol=8 * tolerances.EPS32, atol=0)
  # The same as a ratio: the step size per unit of Adam direction, block 0 over block 1.
  def step_size(i):
    g = np.abs(grads['blocks'][i]['mlp']['up'].get_value())
    return np.abs(updates['blocks'][i]['mlp']['up'].get_value()) * (g + config.eps) / g
  # The updates' 8 eps32 each, and a few more roundings in float32 numpy here.
  np.testing.assert_allclose(step_size(0) / step_size(1), decay, rtol=24 * tolerances.EPS32)


def test_layer_lr_scale_by_path():
  scale = lambda path: optim.layer_lr_scale(path, num_blocks=4, decay=0.5)
  assert scale('blocks/3/attn/q') == 0.5 and scale('base/blocks/0/mlp/up') == 0.5 ** 4
  assert scale('lora/blocks/1/attn/o/lora_a') == 0.5 ** 3
  assert scale('embedding') == scale('base/pos_embedding') == 0.5 ** 5
  assert scale('final_norm/scale') == scale('classifier/kernel') == 1.0


def test_frozen_parameters_have_no_moments():
  config = _config(freeze=('embed/.*',))
  tx = optim.make_optimizer(config, total_steps=10)
  params = _params()
  state = tx.init(params)
  moments = sum(x.nbytes for x in jax.tree.leaves(state) if x.ndim > 0)
  trainable = sum(p.get_value().nbytes for k, p in nnx.to_flat_state(params) if k[0] != 'embed')
  assert moments == 2 * trainable
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  assert not updates['embed']['embedding'].get_value().any()
  assert updates['dense']['kernel'].get_value().all()


def test_freeze_and_layer_decay_errors_name_the_field():
  params = _params()
  with pytest.raises(ValueError, match=r"config.optim.freeze pattern 'dense/bias'"):
    optim.make_optimizer(_config(freeze=('dense/bias',)), 10).init(params)
  with pytest.raises(ValueError, match='config.optim.freeze: bad regular expression'):
    optim.make_optimizer(_config(freeze=('dense/(',)), 10)
  with pytest.raises(ValueError, match='every parameter is frozen'):
    optim.make_optimizer(_config(freeze=('.*',)), 10).init(params)
  for bad in (0.0, 1.5):
    with pytest.raises(ValueError, match='config.optim.layer_decay'):
      optim.make_optimizer(_config(layer_decay=bad), 10)
  tx = optim.make_optimizer(_config(layer_decay=0.8), 10)
  with pytest.raises(ValueError, match='needs parameters under blocks'):
    tx.update(params, tx.init(params), params)

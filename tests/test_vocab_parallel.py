"""Vocab-parallel cross-entropy: parity with the plain loss, dispatch, and no logits gather."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

import tolerances
from llmopt_jax import losses, sharding, vocab_parallel

B, T, V = 4, 8, 64

# (mesh shape, rules['vocab']): one mesh axis, then a tuple of two.
LAYOUTS = [
    ({'data': 2, 'fsdp': 1, 'tensor': 4}, 'tensor'),
    ({'data': 2, 'fsdp': 2, 'tensor': 2}, ('fsdp', 'tensor')),
]


def make_rules(vocab):
  # With fsdp in the vocab, the batch keeps only the axes that are left.
  batch = ('data', 'fsdp') if vocab == 'tensor' else 'data'
  return {**sharding.DATA_PARALLEL_RULES, 'batch': batch, 'vocab': vocab}


def reference(logits, targets, weights):
  """-log_softmax at the target, written independently of both implementations."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * weights), jnp.sum(weights)


def loss_tolerance(logits, weights, want) -> float:
  """Float32 cross-entropy sums computed two ways: per position a log-sum-exp over V (its
  sum, exp and log, relative to the largest logit) less the target's logit, then the sum of
  the positive per-position losses."""
  per_position = tolerances.sum_tolerance(V + 2, float(np.max(np.abs(np.asarray(logits)))))
  return per_position * float(np.sum(weights)) + tolerances.sum_tolerance(B * T, float(want))


def inputs(mesh, rules, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  # Scaled up so the softmax is far from uniform and the max subtraction matters.
  logits = 4.0 * jax.random.normal(k1, (B, T, V), jnp.float32)
  targets = jax.random.randint(k2, (B, T), 0, V)
  weights = (jax.random.uniform(k3, (B, T)) > 0.3).astype(jnp.float32)  # some padding
  put = lambda x, axes: jax.device_put(
      x, NamedSharding(mesh, sharding.logical_to_spec(axes, rules)))
  return (put(logits, ('batch', 'length', 'vocab')), put(targets, ('batch', 'length')),
          put(weights, ('batch', 'length')))


@pytest.mark.parametrize('shape, vocab', LAYOUTS)
def test_matches_plain_loss_and_gradient(shape, vocab):
  mesh, rules = sharding.make_mesh(shape), make_rules(vocab)
  assert vocab_parallel.vocab_is_split(mesh, rules)
  logits, targets, weights = inputs(mesh, rules)

  def parallel(logits):
    return vocab_parallel.cross_entropy_sum(logits, targets, weights, mesh=mesh, rules=rules)

  nll_sum, weight_sum = jax.jit(parallel)(logits)
  want_nll, want_weight = reference(logits, targets, weights)
  # The shards' partial sums add up in another order than one device's.
  np.testing.assert_allclose(nll_sum, want_nll, rtol=0,
                             atol=loss_tolerance(logits, weights, want_nll))
  np.testing.assert_allclose(weight_sum, want_weight, rtol=0)  # 0/1 weights: exact counts

  grad = jax.jit(jax.grad(lambda x: parallel(x)[0]))(logits)
  want_grad = jax.grad(lambda x: reference(x, targets, weights)[0])(logits)
  # softmax - one-hot: probabilities from a V-term sum, an exp and a division.
  np.testing.assert_allclose(grad, want_grad, rtol=0, atol=tolerances.sum_tolerance(V + 2, 1.0))
  # Padding positions get no gradient at all.
  assert not np.any(np.asarray(grad)[np.asarray(weights) == 0])


def test_not_split_when_vocab_replicated_or_on_a_size_one_axis():
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 1, 'tensor': 4})
  assert not vocab_parallel.vocab_is_split(mesh, sharding.DATA_PARALLEL_RULES)
  assert not vocab_parallel.vocab_is_split(mesh, make_rules('fsdp'))


def test_losses_dispatch_to_vocab_parallel_under_rules(monkeypatch):
  shape, vocab = LAYOUTS[0]
  mesh, rules = sharding.make_mesh(shape), make_rules(vocab)
  logits, targets, weights = inputs(mesh, rules, seed=1)
  calls = []
  real = vocab_parallel.cross_entropy_sum
  monkeypatch.setattr(vocab_parallel, 'cross_entropy_sum',
                      lambda *a, **k: calls.append(1) or real(*a, **k))

  def under_rules(logits, targets, weights):
    with sharding.use(mesh, rules):
      return losses.cross_entropy_sum(logits, targets, weights)

  got = jax.jit(under_rules)(logits, targets, weights)
  assert calls, 'losses.cross_entropy_sum did not take the vocab-parallel path'
  want, _ = reference(logits, targets, weights)
  np.testing.assert_allclose(got[0], want, rtol=0, atol=loss_tolerance(logits, weights, want))
  np.testing.assert_allclose(got[1], np.sum(weights), rtol=0)  # 0/1 weights: exact counts
  # The traced program holds the shard_map and its collectives, not a plain log-softmax.
  jaxpr = str(jax.make_jaxpr(under_rules)(logits, targets, weights))
  assert 'shard_map' in jaxpr and 'pmax' in jaxpr

  # Outside `use(...)` the plain form runs.
  calls.clear()
  got = jax.jit(losses.cross_entropy_sum)(logits, targets, weights)
  np.testing.assert_allclose(got[0], want, rtol=0, atol=loss_tolerance(logits, weights, want))
  np.testing.assert_allclose(got[1], np.sum(weights), rtol=0)
  assert not calls


@pytest.mark.parametrize('shape, vocab', LAYOUTS)
def test_full_logits_are_never_gathered(shape, vocab):
  mesh, rules = sharding.make_mesh(shape), make_rules(vocab)
  logits, targets, weights = inputs(mesh, rules)

  def loss_and_grad(logits):
    def nll(x):
      return vocab_parallel.cross_entropy_sum(x, targets, weights, mesh=mesh, rules=rules)[0]
    return jax.value_and_grad(nll)(logits)

  hlo = jax.jit(loss_and_grad).lower(logits).compile().as_text()
  # Forward and backward: only [b, t] and scalar all-reduces cross devices.
  assert 'all-gather' not in hlo
  assert 'all-to-all' not in hlo
  assert 'all-reduce' in hlo


def test_uneven_vocab_fails_with_a_reason():
  shape, vocab = LAYOUTS[0]
  mesh, rules = sharding.make_mesh(shape), make_rules(vocab)
  logits = jnp.zeros((B, T, V + 2))
  with pytest.raises(ValueError, match='not divisible'):
    vocab_parallel.cross_entropy_sum(
        logits, jnp.zeros((B, T), jnp.int32), jnp.ones((B, T)), mesh=mesh, rules=rules)

"""The UDA consistency loss: zero for agreeing predictions, the closed-form KL and gradient,
the clean side held fixed, sharpening and the confidence mask."""

import jax
import jax.numpy as jnp
import numpy as np

from llmopt_jax.consistency import consistency_loss

# float32 softmax/log-softmax over 7 classes: a few ulps per entry, summed over the row.
RTOL = 1e-5


def logits(seed: int, rows: int = 5, classes: int = 7) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (rows, classes)) * 3


def test_identical_predictions_cost_nothing():
  x = logits(0)
  loss, weight = consistency_loss(x, x, jnp.ones(5), temperature=1.0, confidence=0.0)
  assert weight == 5
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)


def test_value_and_gradient_have_the_closed_form():
  clean, aug, w = logits(1), logits(2), jnp.array([1.0, 0.5, 0.0, 2.0, 1.0])
  loss, weight = consistency_loss(clean, aug, w, temperature=0.5, confidence=0.0)
  p = jax.nn.softmax(clean / 0.5, axis=-1)
  q = jax.nn.softmax(aug, axis=-1)
  expected = np.sum(np.asarray(w) * np.sum(p * (np.log(p) - np.log(q)), axis=-1))
  np.testing.assert_allclose(loss, expected, rtol=RTOL)
  assert weight == float(jnp.sum(w))

  grad_aug, grad_clean = jax.grad(
      lambda a, c: consistency_loss(c, a, w, temperature=0.5, confidence=0.0)[0],
      argnums=(0, 1))(aug, clean)
  np.testing.assert_allclose(grad_aug, np.asarray(w)[:, None] * (q - p), rtol=RTOL, atol=1e-6)
  assert not np.any(grad_clean)  # the clean prediction is the fixed target


def test_only_confident_clean_predictions_count():
  clean = jnp.array([[4.0, 0.0, 0.0], [0.1, 0.0, 0.0]])  # max prob ~0.96 and ~0.36
  aug = jnp.zeros((2, 3))
  loss, weight = consistency_loss(clean, aug, jnp.ones(2), temperature=1.0, confidence=0.8)
  alone, _ = consistency_loss(clean[:1], aug[:1], jnp.ones(1), temperature=1.0, confidence=0.0)
  assert weight == 1
  np.testing.assert_allclose(loss, alone, rtol=RTOL)

"""Consistency training (UDA, Xie et al., 2019): a model should predict the same for an
example and for its augmentation, which unlabelled text can teach.

The loss is KL(p_target || p_aug) per row, where p_aug = softmax(logits of the augmented text)
and the target is the prediction on the clean text, held fixed (`stop_gradient`: the clean
prediction is the teacher, as in UDA) and sharpened, softmax(clean logits / T) with T < 1, so
that it pushes toward a confident answer rather than toward the model's current uncertainty.
Rows where the clean prediction is not confident (max probability below `confidence`) are
left out: early in training those targets are mostly noise. The loss is returned, like every
loss here, as float32 (sum, weight) over the rows kept, so callers divide once after summing
over micro-batches and hosts.

With T = 1 and no confidence mask it is exactly KL(softmax(clean) || softmax(aug)), zero when
the two predictions agree; its gradient with respect to the augmented logits of row i is
w_i * (softmax(aug_i) - p_target_i).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def consistency_loss(clean_logits: jax.Array, augmented_logits: jax.Array, weights: jax.Array,
                     *, temperature: float = 0.4, confidence: float = 0.8
                     ) -> tuple[jax.Array, jax.Array]:
  """(sum over kept rows of w * KL(target || p_aug), sum of their weights); [B, C] logits."""
  if clean_logits.shape != augmented_logits.shape:
    raise ValueError(f'clean logits {clean_logits.shape} and augmented logits '
                     f'{augmented_logits.shape} must have the same shape')
  clean = jax.lax.stop_gradient(clean_logits).astype(jnp.float32)
  log_target = jax.nn.log_softmax(clean / temperature, axis=-1)
  log_aug = jax.nn.log_softmax(augmented_logits.astype(jnp.float32), axis=-1)
  target = jnp.exp(log_target)
  kl = jnp.sum(target * jnp.where(target > 0, log_target - log_aug, 0.0), axis=-1)
  confident = jnp.max(jax.nn.softmax(clean, axis=-1), axis=-1) >= confidence
  kept = jnp.where(confident, weights.astype(jnp.float32), 0.0)
  return jnp.sum(jnp.where(kept > 0, kl * kept, 0.0)), jnp.sum(kept)

"""Token-level losses and metrics for language models, as (sum, count) pairs.

All of them work in float32 whatever the compute dtype of the logits: a log-softmax over a
large vocabulary in bf16 loses the small probabilities that the loss is made of.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llmopt_jax import sharding, vocab_parallel
from llmopt_jax.metrics import MetricSums


def cross_entropy_sum(
    logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sum of -log p(target) over weighted positions, and the sum of weights.

  logits: [B, T, V]; targets: [B, T] int; weights: [B, T] (0 for padding). When traced
  under `sharding.use(...)` with rules that split the vocabulary (tensor parallelism), the
  sum is taken shard by shard with explicit collectives (see `vocab_parallel`), so that no
  [B, T, V] all-gather can appear whatever the partitioner decides for the plain form below.
  """
  active = sharding.active()
  if active is not None and vocab_parallel.vocab_is_split(*active):
    mesh, rules = active
    return vocab_parallel.cross_entropy_sum(logits, targets, weights, mesh=mesh, rules=rules)
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)                                   # [B, T]
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = log_z - target_logit
  return jnp.sum(nll * weights), jnp.sum(weights)


def accuracy_sum(
    logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Number of weighted positions whose arg-max prediction is the target, and the weight."""
  # No vocab-parallel twin needed: on vocab-sharded logits the compiler partitions argmax into
  # a local (max, index) reduction and a small cross-shard one, without gathering the logits.
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(correct * weights), jnp.sum(weights)


def lm_metrics(logits: jax.Array, batch: dict[str, jax.Array]) -> MetricSums:
  return {
      'loss': cross_entropy_sum(logits, batch['targets'], batch['weights']),
      'accuracy': accuracy_sum(logits, batch['targets'], batch['weights']),
  }


def lm_loss(
    model: nnx.Module, batch: dict[str, jax.Array], rngs: nnx.Rngs | None, context=None
) -> tuple[jax.Array, jax.Array, MetricSums]:
  """Next-token cross-entropy: (objective sum, weight, metric sums) for the train step."""
  del context
  logits = model(batch['inputs'], rngs=rngs)
  sums = lm_metrics(logits, batch)
  loss_sum, weight = sums['loss']
  return loss_sum, weight, sums


def lm_eval(model: nnx.Module, batch: dict[str, jax.Array]) -> MetricSums:
  """Deterministic (no dropout) metric sums for evaluation."""
  return lm_metrics(model(batch['inputs']), batch)


def classification_loss(
    logits: jax.Array, labels: jax.Array, weights: jax.Array, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array]:
  """Sum over examples of weighted cross-entropy against smoothed targets, and the weight.

  logits: [B, C]; labels: [B] int; weights: [B] (0 for padding rows). With smoothing e the
  target puts 1 - e on the label and e / C on every class (Szegedy et al., 2016), so
  loss = (1 - e) * (-log p_label) + e * mean_c(-log p_c). Float32 whatever the logits' dtype.
  """
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)         # [B, C]
  nll = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]       # [B]
  loss = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_p, axis=-1)
  # `where`, not just the product: a padding row's NaN would survive 0 * NaN in the sum.
  weights = weights.astype(jnp.float32)
  return jnp.sum(jnp.where(weights > 0, loss * weights, 0.0)), jnp.sum(weights)

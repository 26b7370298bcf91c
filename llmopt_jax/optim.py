"""The optimizer: one Optax chain built from `config.optim`.

    clip_by_global_norm -> AdamW(schedule, weight-decay mask)

AdamW is Loshchilov & Hutter (2019). Weight decay is applied only to matrices: decaying RMSNorm
scales and biases pulls them towards zero for no regularisation benefit, and whether the token
embedding is decayed is a research choice (`decay_embeddings`).

Gradient accumulation lives here too (`accumulate_gradients`): the train step runs the
micro-batches in a `lax.scan` and sums gradients of *loss sums*, dividing once by the total
weight, so k micro-batches give exactly the gradient of the one big batch even when micro-
batches hold different numbers of real tokens. (`optax.MultiSteps` averages per-micro-batch
means instead, which differs when token counts differ, and it keeps a persistent gradient
buffer in the checkpoint.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import einops
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

SCHEDULES = ('cosine', 'linear', 'constant')

# Parameter names (the last path entry) that are never decayed: norm scales and biases.
_NO_DECAY_NAMES = frozenset({'scale', 'bias'})
_EMBEDDING_NAMES = frozenset({'embedding'})


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine or linear decay to `lr * end_lr_factor`."""
  if optim.schedule not in SCHEDULES:
    raise ValueError(f'config.optim.schedule={optim.schedule!r}; choose from {SCHEDULES}')
  if optim.warmup_steps < 0 or optim.warmup_steps > total_steps:
    raise ValueError(
        f'config.optim.warmup_steps={optim.warmup_steps} must lie in [0, {total_steps}]')
  warmup = optax.linear_schedule(0.0, optim.lr, max(optim.warmup_steps, 1))
  decay_steps = max(total_steps - optim.warmup_steps, 1)
  end_lr = optim.lr * optim.end_lr_factor
  decay = {
      'cosine': optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr_factor),
      'linear': optax.linear_schedule(optim.lr, end_lr, decay_steps),
      'constant': optax.constant_schedule(optim.lr),
  }[optim.schedule]
  if optim.warmup_steps == 0:
    return decay
  return optax.join_schedules([warmup, decay], boundaries=[optim.warmup_steps])


def decay_mask(params: Any, *, decay_embeddings: bool) -> Any:
  """True for parameters that receive weight decay, by their name in the model."""
  skip = _NO_DECAY_NAMES | (frozenset() if decay_embeddings else _EMBEDDING_NAMES)

  def decays(path, _) -> bool:
    return _leaf_name(path) not in skip
  return jax.tree_util.tree_map_with_path(
      decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, 'key', getattr(last, 'name', last)))


def make_optimizer(
    optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """The full update rule: optional global-norm clipping, then AdamW on a schedule."""
  schedule = make_schedule(optim, total_steps)
  adamw = optax.adamw(
      schedule,
      b1=optim.b1,
      b2=optim.b2,
      eps=optim.eps,
      weight_decay=optim.weight_decay,
      mask=lambda p: decay_mask(p, decay_embeddings=optim.decay_embeddings),
  )
  if optim.clip_norm <= 0:
    return adamw
  return optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw)


# (loss_sum, (weight, metric_sums)), grads
LossAndGrad = Callable[[Any, Mapping[str, jax.Array], jax.Array], Any]


def accumulate_gradients(
    loss_and_grad: LossAndGrad,
    params: Any,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    num_micro_batches: int,
) -> tuple[Any, jax.Array, dict[str, Any]]:
  """Sums the loss-sum gradients of `num_micro_batches` slices of `batch`.

  Returns (gradient of the loss *sum*, total weight, summed metrics). With one micro-batch this
  is a single call. Micro-batch i takes rows i, i+k, i+2k, ...: when the batch axis is split
  over devices, every device then holds its share of every micro-batch.
  """
  if num_micro_batches == 1:
    (_, (weight, sums)), grads = loss_and_grad(params, batch, rng)
    return grads, weight, sums

  micro = jax.tree.map(
      lambda x: einops.rearrange(x, '(b k) ... -> k b ...', k=num_micro_batches), batch)

  def one_micro_batch(carry, inputs):
    index, micro_batch = inputs
    grads, weight, sums = carry
    (_, (w, s)), g = loss_and_grad(params, micro_batch, jax.random.fold_in(rng, index))
    return (jax.tree.map(jnp.add, grads, g), weight + w, jax.tree.map(jnp.add, sums, s)), None

  # The carry's shapes come from one abstract evaluation of the loss.
  (_, (w0, s0)), g0 = jax.eval_shape(
      loss_and_grad, params, jax.tree.map(lambda x: x[0], micro), rng)
  zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree)
  init = (zeros(g0), zeros(w0), zeros(s0))
  (grads, weight, sums), _ = jax.lax.scan(
      one_micro_batch, init, (jnp.arange(num_micro_batches), micro))
  return grads, weight, sums

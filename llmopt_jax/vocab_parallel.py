"""Cross-entropy on vocab-sharded logits, without ever gathering the full vocabulary.

Megatron-style vocab-parallel cross-entropy (Shoeybi et al. 2019, "Megatron-LM", sec. 3).
With tensor parallelism the unembedding is split over the vocabulary, so each of the n
devices of the `vocab` mesh axes holds logits x[b, t, V/n] for its slice [s, s + V/n) of the
vocabulary. For a target y the loss is

  nll = log sum_v exp(x_v) - x_y = m + log sum_v exp(x_v - m) - x_y,   m = max_v x_v

and every term is a reduction over v, so it is a local reduction followed by one collective:

  m       = pmax_n(max over the local V/n)                  [b, t]
  Z       = psum_n(sum over the local V/n of exp(x - m))    [b, t]
  x_y     = psum_n(x[y - s] if s <= y < s + V/n else 0)     [b, t]

Three [b, t] collectives replace an all-gather of [b, t, V], the largest activation of a
language model. XLA's partitioner may find the same plan for the plain log-softmax (it does on
CPU with jax 0.10), but that is a compiler heuristic; written out, it is a property of the
code. The backward pass adds no collective: w * (softmax - onehot) is local to each shard.
The (sum, weight) pair is then summed over the batch and length shards, so the result is
global and replicated, like `losses.cross_entropy_sum`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from llmopt_jax import sharding

_LOGITS_AXES = ('batch', 'length', 'vocab')
_TOKEN_AXES = ('batch', 'length')


def _axes_of(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry, as a tuple (empty when replicated)."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _placement(rules: sharding.Rules) -> tuple[PartitionSpec, tuple[str, ...], tuple[str, ...]]:
  """(logits spec, vocab mesh axes, token mesh axes) as the rules place the logits.

  Read from the PartitionSpec rather than the rules table, so a mesh axis taken by the batch
  is not counted again for the vocabulary (the rules are first come, first served).
  """
  spec = sharding.logical_to_spec(_LOGITS_AXES, rules)
  batch, length, vocab = (_axes_of(e) for e in tuple(spec) + (None,) * (3 - len(spec)))
  return spec, vocab, batch + length


def _split_size(mesh: Mesh, axes: tuple[str, ...]) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def vocab_is_split(mesh: Mesh, rules: sharding.Rules) -> bool:
  """Whether the rules split the vocabulary over more than one device of `mesh`."""
  sharding.check_rules(mesh, rules)
  return _split_size(mesh, _placement(rules)[1]) > 1


def cross_entropy_sum(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    mesh: Mesh,
    rules: sharding.Rules,
) -> tuple[jax.Array, jax.Array]:
  """Sum of -log p(target) over weighted positions, and the sum of weights, vocab-parallel.

  logits: [B, T, V]; targets: [B, T] int; weights: [B, T] (0 for padding). The same result
  as `losses.cross_entropy_sum`, but computed shard by shard on `mesh` as the rules place
  the logits: ('batch', 'length', 'vocab').
  """
  if logits.ndim != 3 or targets.shape != logits.shape[:2] or weights.shape != targets.shape:
    raise ValueError(
        f'expected logits [B, T, V] and targets, weights [B, T]; got {logits.shape}, '
        f'{targets.shape}, {weights.shape}')
  # token_axes: every mesh axis that splits token positions; the loss sum is reduced over them.
  logits_spec, vocab_axes, token_axes = _placement(rules)
  vocab_size = logits.shape[-1]
  n = _split_size(mesh, vocab_axes)
  if vocab_size % n:
    # shard_map needs even shards; the sharded embedding table already needs this as well.
    raise ValueError(
        f'vocab size {vocab_size} is not divisible by the {n} devices of mesh axes '
        f'{vocab_axes} that rules["vocab"] splits it over; round config.model.vocab_size up')
  token_spec = sharding.logical_to_spec(_TOKEN_AXES, rules)

  # check_vma stays on: it checks at trace time that the scalar outputs really are the same
  # on every device (out_specs P()), i.e. that no psum over a splitting mesh axis is missing.
  return jax.shard_map(
      functools.partial(_local_cross_entropy, vocab_axes=vocab_axes, token_axes=token_axes),
      mesh=mesh,
      in_specs=(logits_spec, token_spec, token_spec),
      out_specs=(PartitionSpec(), PartitionSpec()),
      check_vma=True,
  )(logits, targets, weights)


def _local_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array, *,
                          vocab_axes: tuple[str, ...], token_axes: tuple[str, ...]):
  """One device's share of `cross_entropy_sum`: its vocabulary slice of the logits."""
  logits = logits.astype(jnp.float32)                                     # [b, t, V/n]
  shard_vocab = logits.shape[-1]
  # The max only keeps exp() in range; logsumexp's value and gradient do not depend on it.
  local_max = jnp.max(jax.lax.stop_gradient(logits), axis=-1)             # [b, t]
  global_max = jax.lax.pmax(local_max, vocab_axes) if vocab_axes else local_max
  sum_exp = jnp.sum(jnp.exp(logits - global_max[..., None]), axis=-1)    # [b, t]
  if vocab_axes:
    sum_exp = jax.lax.psum(sum_exp, vocab_axes)
  log_z = global_max + jnp.log(sum_exp)                                   # [b, t]

  # axis_index of a tuple is row-major over it, the order a PartitionSpec splits a dim in.
  start = jax.lax.axis_index(vocab_axes) * shard_vocab if vocab_axes else 0
  local_target = targets - start                                          # [b, t]
  mine = (local_target >= 0) & (local_target < shard_vocab)
  # Out-of-shard targets read a clipped, valid index and are then zeroed: exactly one shard
  # contributes each target logit to the psum, and only it receives that gradient.
  picked = jnp.take_along_axis(
      logits, jnp.clip(local_target, 0, shard_vocab - 1)[..., None], axis=-1)[..., 0]
  target_logit = jnp.where(mine, picked, 0.0)
  if vocab_axes:
    target_logit = jax.lax.psum(target_logit, vocab_axes)

  weights = weights.astype(jnp.float32)
  nll_sum = jnp.sum((log_z - target_logit) * weights)
  weight_sum = jnp.sum(weights)
  if token_axes:
    nll_sum, weight_sum = jax.lax.psum((nll_sum, weight_sum), token_axes)
  return nll_sum, weight_sum

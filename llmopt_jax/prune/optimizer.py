"""Pruning inside the one train step: an Optax wrapper around the run's own optimizer.

The trained tree is {'base': model params, 'mask': one 0/1 array per target kernel}
(`masks.with_masks`); the masks live beside the weights they mask, shard like them, and are
checkpointed and restored with them. The wrapper hands the inner optimizer (AdamW with its
schedule, clipping, frozen parameters, layer decay) the base parameters only, then:

  masked updates    a pruned weight's gradient is zeroed before the inner optimizer sees it,
                    so its moments get nothing, and its update is set to bring it to exactly
                    0 (AdamW's decay and any moments left from before it was pruned included)
  mask updates      on the schedule's steps (`schedule.Gradual`), the masks are recomputed
                    from the updated weights (magnitude, random, or taylor: |w * gradient|)
                    at the scheduled sparsity; the moments of newly pruned weights are zeroed
  straight-through  with `ste`, gradients and updates stay dense: the forward pass alone is
                    masked (`params_transform`), and a pruned weight can grow back at the
                    next mask update

The mask's own "update" is new mask - old mask, so `optax.apply_updates` leaves exactly the
new 0/1 mask; its gradient (computed by the step, never read) is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llmopt_jax import optim
from llmopt_jax.prune import masks as masks_lib
from llmopt_jax.prune import scores
from llmopt_jax.prune.config import PruneConfig
from llmopt_jax.prune.masks import BASE, MASK, Path, Target
from llmopt_jax.prune.schedule import Gradual


class PruneState(NamedTuple):
  count: jax.Array           # updates applied so far (the train state's step)
  inner: optax.OptState      # the wrapped optimizer's state, for the base parameters


def _as_bools(masks: Mapping[Path, jax.Array]) -> dict[Path, jax.Array]:
  return {p: m.astype(bool) for p, m in masks.items()}


def _new_masks(cfg: PruneConfig, chosen: Mapping[Path, Target], schedule: Gradual,
               count: jax.Array, params: nnx.State, grads: nnx.State,
               old: dict[Path, jax.Array]) -> dict[Path, jax.Array]:
  """The masks after update `count` + 1: recomputed on the schedule's steps, else `old`."""
  def recompute():
    if cfg.method == 'magnitude':
      score = scores.magnitude(params, chosen)
    elif cfg.method == 'taylor':
      score = scores.taylor(params, grads, chosen)
    else:  # random: a fresh draw each time, from the recipe's seed and the step
      score = scores.random(chosen, jax.random.fold_in(jax.random.key(cfg.seed), count))
    return masks_lib.keep(score, chosen, cfg, schedule.sparsity(count))
  return jax.lax.cond(schedule.updates_at(count), recompute, lambda: old)


def _zero_where_pruned(tree: Any, masks: Mapping[str, jax.Array]) -> Any:
  """Every array in `tree` (an optimizer state) that belongs to a masked kernel (its path
  ends with the kernel's path and its shape is the kernel's), zeroed where the mask is 0."""
  def zeroed(path, leaf):
    parts = optim.param_path(path).split('/')
    for i in range(len(parts)):
      mask = masks.get('/'.join(parts[i:]))
      if mask is not None and getattr(leaf, 'shape', None) == mask.shape:
        return jnp.where(mask, leaf, jnp.zeros((), leaf.dtype))
    return leaf
  return jax.tree_util.tree_map_with_path(zeroed, tree)


def wrap(inner: optax.GradientTransformation, cfg: PruneConfig,
         chosen: Mapping[Path, Target]) -> optax.GradientTransformation:
  """`inner` for the base parameters of a {'base', 'mask'} tree, keeping pruned weights at
  zero and (with a gradual schedule) updating the masks on schedule."""
  schedule = Gradual.of(cfg) if cfg.schedule == 'gradual' else None

  def init(tree):
    return PruneState(jnp.zeros((), jnp.int32), inner.init(tree[BASE]))

  def update(grads, state: PruneState, tree=None):
    params, old = masks_lib.split(tree)
    old = _as_bools(old)
    base_grads = grads[BASE] if cfg.ste else masks_lib.apply(grads[BASE], old)
    updates, inner_state = inner.update(base_grads, state.inner, params)
    new = old
    if schedule is not None:
      new = _new_masks(cfg, chosen, schedule, state.count,
                       optax.apply_updates(params, updates), grads[BASE], old)
    if not cfg.ste:  # pruned weights land on exactly 0; their moments restart from 0
      updates = _updates_to_zero(updates, params, new)
      by_name = {_value_path(p): m for p, m in new.items()}
      inner_state = _zero_where_pruned(inner_state, by_name)
    return (nnx.State({BASE: updates, MASK: _mask_updates(tree[MASK], new)}),
            PruneState(state.count + 1, inner_state))

  return optax.GradientTransformation(init, update)


def _mask_updates(current: nnx.State, new: Mapping[Path, jax.Array]) -> nnx.State:
  """new - current for every mask: adding it gives exactly the new 0/1 values."""
  return nnx.from_flat_state([
      (parts, var.replace(new[tuple(parts)].astype(var.get_value().dtype) - var.get_value()))
      for parts, var in nnx.to_flat_state(current)])


def _value_path(parts: Path) -> str:
  """The path of a kernel's array in a flattened pytree ('.../attn/q/value')."""
  return masks_lib.path_name(parts) + '/value'


def _updates_to_zero(updates: nnx.State, params: nnx.State,
                     keep: Mapping[Path, jax.Array]) -> nnx.State:
  """Updates with a pruned weight's entry set to -w: after the update it is exactly 0."""
  flat_params = dict(nnx.to_flat_state(params))
  out = []
  for parts, var in nnx.to_flat_state(updates):
    mask = keep.get(tuple(parts))
    if mask is not None:
      var = var.replace(jnp.where(mask, var.get_value(), -flat_params[parts].get_value()))
    out.append((parts, var))
  return nnx.from_flat_state(out)


def params_transform(cfg: PruneConfig):
  """The step's view of a {'base', 'mask'} tree: the model's parameters, masked. Without
  `ste` the base weights are already zero where pruned (masking again costs one select);
  with it, the forward pass uses masked weights while the gradient reaches every weight."""
  def transform(tree: nnx.State, rng: jax.Array | None) -> nnx.State:
    del rng
    params, masks = masks_lib.split(tree)
    masked = masks_lib.apply(params, _as_bools(masks))
    if not cfg.ste:
      return masked
    return jax.tree.map(lambda w, m: w + jax.lax.stop_gradient(m - w), params, masked)
  return transform

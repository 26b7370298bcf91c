"""Which weights a recipe prunes, and the keep-masks that choose them.

  targets(params, cfg)              the kernels a recipe prunes, each with its matrix view
  keep(scores, targets, cfg, s)     keep-masks from scores: the lowest-scoring weights of each
                                    comparison group (the granularity) are removed
  apply(params, masks)              the parameters with pruned weights set to exactly zero
  with_masks / split                the trained tree {'base': params, 'mask': masks}

Every kernel is seen as a matrix [I, O]: its leading input dims (`lora.input_dims`: D for q,
k, v, gate and up; N*H for o; F for down) by the rest. Output channels are its columns, and
an n:m group is m consecutive inputs of one column.

Counts are exact: a group of `size` weights at sparsity s loses round(s * size) of them,
chosen by rank (a stable sort), so ties never change how many go.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llmopt_jax import lora, optim
from llmopt_jax.prune.config import PruneConfig

Path = tuple[Any, ...]
BASE, MASK = 'base', 'mask'
# Masks are 0/1 in the kernels' layout; bfloat16 holds both exactly at half float32's bytes.
MASK_DTYPE = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class Target:
  """A kernel to prune: its shape and how many of its leading dims are inputs."""
  shape: tuple[int, ...]
  inputs: int

  @property
  def matrix(self) -> tuple[int, int]:
    """(I, O): the kernel as the matrix it multiplies its inputs with."""
    rows = math.prod(self.shape[:self.inputs])
    return rows, math.prod(self.shape) // rows

  def as_matrix(self, x: jax.Array) -> jax.Array:
    return x.reshape(self.matrix)


def path_name(parts: Path) -> str:
  return optim.param_path(parts)


def targets(params: nnx.State, cfg: PruneConfig) -> dict[Path, Target]:
  """{path: Target} of the kernels `cfg` prunes. Fails when nothing matches (a typo in a
  pattern would otherwise leave the model dense) and when an n:m pattern does not tile a
  kernel's inputs."""
  chosen = {}
  flat = list(nnx.to_flat_state(params))
  for parts, var in flat:
    path = path_name(parts)
    if not lora.is_kernel(parts, var) or not lora.matches(cfg.targets, path):
      continue
    if lora.matches(cfg.exclude, path):
      continue
    target = Target(tuple(var.get_value().shape), lora.input_dims(var))
    if cfg.granularity == 'nm' and target.matrix[0] % cfg.m:
      raise ValueError(f'config.prune.m={cfg.m}: {path} has {target.matrix[0]} inputs, not a '
                       f'multiple of m; exclude it (config.prune.exclude) or choose another m')
    chosen[tuple(parts)] = target
  if not chosen:
    examples = [path_name(p) for p, v in flat if lora.is_kernel(p, v)][:4]
    raise ValueError(f'config.prune.targets {cfg.targets} (minus exclude) match no kernel; '
                     f'kernel paths look like {examples}')
  return chosen


def _ranks(scores: jax.Array, axis: int) -> jax.Array:
  """Each score's rank within its slice along `axis` (0 = lowest; ties by position)."""
  return jnp.argsort(jnp.argsort(scores, axis=axis, stable=True), axis=axis, stable=True)


def _keep_all_but_lowest(scores: jax.Array, count: int, axis: int) -> jax.Array:
  return _ranks(scores, axis) >= count


def keep(scores: Mapping[Path, jax.Array], chosen: Mapping[Path, Target], cfg: PruneConfig,
         sparsity: float | jax.Array | None = None) -> dict[Path, jax.Array]:
  """Boolean keep-masks (each in its kernel's shape) removing the lowest `scores` at
  `sparsity` (default: the recipe's) within each group of the recipe's granularity."""
  sparsity = cfg.target_sparsity if sparsity is None else sparsity
  matrices = {p: chosen[p].as_matrix(s.astype(jnp.float32)) for p, s in scores.items()}
  if cfg.granularity == 'global':
    kept = _keep_global(matrices, sparsity)
  else:
    group = {'layer': _keep_layer, 'output': _keep_per_output,
             'nm': lambda s, _: _keep_n_of_m(s, cfg.n, cfg.m)}[cfg.granularity]
    kept = {p: group(s, sparsity) for p, s in matrices.items()}
  return {p: k.reshape(chosen[p].shape) for p, k in kept.items()}


def _count(sparsity, size: int):
  """round(sparsity * size), for a Python float or a traced scalar (a gradual schedule)."""
  if isinstance(sparsity, (int, float)):
    return round(sparsity * size)
  return jnp.round(sparsity * size).astype(jnp.int32)


def _keep_layer(scores: jax.Array, sparsity) -> jax.Array:
  flat = scores.reshape(-1)
  return _keep_all_but_lowest(flat, _count(sparsity, flat.size), 0).reshape(scores.shape)


def _keep_per_output(scores: jax.Array, sparsity) -> jax.Array:
  return _keep_all_but_lowest(scores, _count(sparsity, scores.shape[0]), 0)


def _keep_n_of_m(scores: jax.Array, n: int, m: int) -> jax.Array:
  rows, columns = scores.shape
  groups = scores.reshape(rows // m, m, columns)
  return _keep_all_but_lowest(groups, m - n, 1).reshape(rows, columns)


def _keep_global(matrices: Mapping[Path, jax.Array], sparsity) -> dict[Path, jax.Array]:
  """One ranking over every target: the lowest round(s * total) weights go, wherever they
  are."""
  paths = list(matrices)
  flat = jnp.concatenate([matrices[p].reshape(-1) for p in paths])
  kept = _keep_all_but_lowest(flat, _count(sparsity, flat.size), 0)
  out, start = {}, 0
  for p in paths:
    size = matrices[p].size
    out[p] = kept[start:start + size].reshape(matrices[p].shape)
    start += size
  return out


def apply(params: nnx.State, masks: Mapping[Path, jax.Array]) -> nnx.State:
  """`params` with every masked kernel multiplied by its mask (pruned weights exactly 0)."""
  out = []
  for parts, var in nnx.to_flat_state(params):
    mask = masks.get(tuple(parts))
    if mask is not None:
      w = var.get_value()
      var = var.replace(jnp.where(mask.astype(bool), w, jnp.zeros((), w.dtype)))
    out.append((parts, var))
  return nnx.from_flat_state(out)


def with_masks(params: nnx.State, masks: Mapping[Path, jax.Array]) -> nnx.State:
  """The trained tree {'base': params with pruned weights zeroed, 'mask': one 0/1 array per
  target}. Each mask is a variable of its kernel (same logical axes), so it is sharded,
  checkpointed and restored exactly as the kernel is."""
  flat = dict(nnx.to_flat_state(params))
  mask_vars = [(parts, flat[parts].replace(m.astype(MASK_DTYPE))) for parts, m in masks.items()]
  return nnx.State({BASE: apply(params, masks), MASK: nnx.from_flat_state(mask_vars)})


def split(tree: nnx.State) -> tuple[nnx.State, dict[Path, jax.Array]]:
  """(model params, {path: mask}) of a tree made by `with_masks`."""
  masks = {tuple(parts): var.get_value() for parts, var in nnx.to_flat_state(tree[MASK])}
  return tree[BASE], masks


def is_masked_tree(tree: Any) -> bool:
  return isinstance(tree, (nnx.State, dict)) and set(tree) == {BASE, MASK}


def counts(params: nnx.State, chosen: Mapping[Path, Target]) -> tuple[int, int]:
  """(zeros, weights) over the target kernels of `params`: the sparsity actually reached."""
  flat = dict(nnx.to_flat_state(params))
  zeros = sum(int(jnp.sum(flat[p].get_value() == 0)) for p in chosen)
  return zeros, sum(math.prod(t.shape) for t in chosen.values())

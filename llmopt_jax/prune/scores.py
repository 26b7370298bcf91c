"""Score functions: how much each target weight matters (the lowest scores are pruned).

A score has its kernel's shape. The ones that need only the weights (and, in a train step,
the gradient) run inside the optimizer wrapper; Wanda's needs the inputs' norms from a
calibration pass (`calibration.py`). SparseGPT is not a score: it reconstructs the weights
as it chooses the mask (`sparsegpt.py`).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmopt_jax.prune.masks import Path, Target, path_name


def _kernels(params: nnx.State, chosen: Mapping[Path, Target]) -> dict[Path, jax.Array]:
  flat = dict(nnx.to_flat_state(params))
  return {p: flat[p].get_value() for p in chosen}


def magnitude(params: nnx.State, chosen: Mapping[Path, Target]) -> dict[Path, jax.Array]:
  """|w| (Han et al. 2015)."""
  return {p: jnp.abs(w) for p, w in _kernels(params, chosen).items()}


def random(chosen: Mapping[Path, Target], key: jax.Array) -> dict[Path, jax.Array]:
  """Uniform noise, one independent stream per kernel (folded from its path, so adding a
  target does not reshuffle the others): the baseline a method must beat."""
  return {p: jax.random.uniform(_fold(key, path_name(p)), t.shape)
          for p, t in chosen.items()}


def _fold(key: jax.Array, name: str) -> jax.Array:
  return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def taylor(params: nnx.State, grads: nnx.State, chosen: Mapping[Path, Target]
           ) -> dict[Path, jax.Array]:
  """|w * dL/dw|: the first-order change of the loss when w is set to zero (Molchanov et
  al. 2019), from one batch's gradient (in a train step) or from gradients accumulated over
  calibration batches (`oneshot.py`)."""
  g = _kernels(grads, chosen)
  return {p: jnp.abs(w * g[p]) for p, w in _kernels(params, chosen).items()}


def wanda(params: nnx.State, chosen: Mapping[Path, Target],
          input_norms: Mapping[Path, np.ndarray]) -> dict[Path, jax.Array]:
  """|w_ij| * ||X_i||_2 (Sun et al. 2024): a small weight on an input that is large on real
  data (an outlier feature of an LLM) still matters."""
  out = {}
  for p, w in _kernels(params, chosen).items():
    rows, columns = chosen[p].matrix
    norms = jnp.asarray(input_norms[p], jnp.float32).reshape(rows, 1)
    out[p] = (jnp.abs(w.reshape(rows, columns)) * norms).reshape(w.shape)
  return out

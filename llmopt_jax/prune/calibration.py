"""What a kernel sees: statistics of its inputs over calibration batches, for Wanda and
SparseGPT.

Each kernel asked about is swapped for a `_Probe` that records, as the model's own forward
pass runs through it, the inputs it multiplies, flattened to rows x of its matrix view [I, O]
(the contracted dims of the einsum, in the kernel's order):

  sq_sum    [I]     sum over tokens of x_i^2 (Wanda's ||X_i||^2)
  gram      [I, I]  sum over tokens of x x^T (SparseGPT's Hessian, up to the 2/n factor)
  tokens            how many rows were summed

The forward pass is jitted once per set of probed kernels; sums over batches run on the host
in float64, so their order does not matter.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from llmopt_jax.prune.masks import Path, Target


@dataclasses.dataclass(frozen=True)
class InputStats:
  sq_sum: np.ndarray            # [I]
  gram: np.ndarray | None       # [I, I], when asked for
  tokens: int

  @property
  def norms(self) -> np.ndarray:
    """||X_i||_2 per input feature (Wanda's activation factor)."""
    return np.sqrt(self.sq_sum)

  @property
  def hessian(self) -> np.ndarray:
    """Mean x x^T: the layer-wise reconstruction loss's Hessian, up to a factor of 2."""
    return self.gram / max(self.tokens, 1)


class _Sink:
  """Collects one traced call's sums (hashable by identity: a static pytree field)."""

  def __init__(self):
    self.sums: dict[Path, dict[str, jax.Array]] = {}


def _rows(spec: str, x: jax.Array, inputs: int) -> jax.Array:
  """The einsum's left operand as rows [tokens, I] in the kernel's input order."""
  operands, out = spec.replace(' ', '').split('->')
  lhs, rhs = operands.split(',')
  contracted = rhs[:inputs]
  assert all(c in lhs and c not in out for c in contracted), spec
  kept = ''.join(c for c in lhs if c not in contracted)
  x = jnp.einsum(f'{lhs}->{kept}{contracted}', x.astype(jnp.float32))
  return x.reshape(-1, math.prod(x.shape[len(kept):]))


@struct.dataclass
class _Probe:
  weight: jax.Array
  key: Path = struct.field(pytree_node=False)
  inputs: int = struct.field(pytree_node=False)
  gram: bool = struct.field(pytree_node=False)
  sink: _Sink = struct.field(pytree_node=False)

  def einsum(self, spec: str, x: jax.Array, dtype) -> jax.Array:
    rows = _rows(spec, x, self.inputs)
    sums = {'sq_sum': jnp.sum(rows * rows, axis=0),
            'tokens': jnp.asarray(rows.shape[0], jnp.float32)}
    if self.gram:
      sums['gram'] = jnp.einsum('TI,TJ->IJ', rows, rows)
    previous = self.sink.sums.get(self.key)
    self.sink.sums[self.key] = sums if previous is None else jax.tree.map(
        jnp.add, previous, sums)
    return jnp.einsum(spec, x.astype(dtype), self.weight.astype(dtype))

  def take(self, ids: jax.Array, dtype) -> jax.Array:
    return jnp.take(self.weight, ids, axis=0).astype(dtype)  # a lookup has no input rows


def input_stats(graphdef: nnx.GraphDef, params: nnx.State, probed: Mapping[Path, Target],
                forward: Callable[[nnx.Module, dict], Any],
                batches: Iterable[dict[str, np.ndarray]], *, gram: bool = False
                ) -> dict[Path, InputStats]:
  """{path: InputStats} of every kernel in `probed`, over `batches`."""

  @jax.jit
  def sums_of(params, batch):
    sink = _Sink()
    swapped = []
    for parts, var in nnx.to_flat_state(params):
      parts = tuple(parts)
      if parts in probed:
        var = var.replace(_Probe(var.get_value(), parts, probed[parts].inputs, gram, sink))
      swapped.append((parts, var))
    forward(nnx.merge(graphdef, nnx.from_flat_state(swapped)), batch)
    return sink.sums

  totals: dict[Path, dict[str, np.ndarray]] = {}
  for batch in batches:
    for key, sums in jax.device_get(sums_of(params, batch)).items():
      sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
      totals[key] = sums if key not in totals else {
          k: totals[key][k] + v for k, v in sums.items()}
  missing = [p for p in probed if p not in totals]
  if missing:
    raise ValueError(f'calibration saw no input of {"/".join(map(str, missing[0]))} (no '
                     f'calibration batch, or the kernel is only looked up)')
  return {key: InputStats(t['sq_sum'], t.get('gram'), int(t['tokens']))
          for key, t in totals.items()}

"""Static activation ranges: run the float model on calibration batches and record, for every
target kernel, the range of the activations it multiplies.

Each target kernel is swapped for a `_Probe` that computes the range of its input (the
calibration method of the recipe: absmax, percentile or MSE-optimal clip) and hands it to a
sink owned by one traced call, whose outputs the ranges become; the forward pass itself is
the model's own, jitted once. Over batches the absmax ranges take their maximum (a range
must cover every batch seen) and the percentile / MSE ones their mean (their point is to
ignore rare outliers, which a maximum would bring back).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from llmopt_jax.quant import numerics, transform
from llmopt_jax.quant.config import QuantConfig


class _Sink:
  """Collects one traced call's ranges (hashable by identity: a static pytree field)."""

  def __init__(self):
    self.ranges: dict[tuple, jax.Array] = {}


@struct.dataclass
class _Probe:
  weight: jax.Array
  key: tuple = struct.field(pytree_node=False)
  sink: _Sink = struct.field(pytree_node=False)
  cfg: QuantConfig = struct.field(pytree_node=False)

  def einsum(self, spec: str, x: jax.Array, dtype) -> jax.Array:
    self.sink.ranges[self.key] = numerics.activation_range(x, self.cfg)
    return jnp.einsum(spec, x.astype(dtype), self.weight.astype(dtype))

  def take(self, ids: jax.Array, dtype) -> jax.Array:
    return jnp.take(self.weight, ids, axis=0).astype(dtype)  # a lookup has no activation


def activation_ranges(graphdef: nnx.GraphDef, params: nnx.State, cfg: QuantConfig,
                      forward: Callable[[nnx.Module, dict], Any],
                      batches: Iterable[dict[str, np.ndarray]]) -> dict[tuple, jax.Array]:
  """{kernel path: |activation| range} over `batches` for every target kernel of `cfg`.

  Kernels that only look rows up (an untied embedding table) get no range; the quantized
  model never quantizes a lookup's output.
  """
  chosen = transform.targets(params, cfg)

  @jax.jit
  def ranges_of(params, batch):
    sink = _Sink()
    probed = []
    for parts, var in nnx.to_flat_state(params):
      if tuple(parts) in chosen:
        var = var.replace(_Probe(var.get_value(), tuple(parts), sink, cfg))
      probed.append((parts, var))
    forward(nnx.merge(graphdef, nnx.from_flat_state(probed)), batch)
    return sink.ranges

  seen: dict[tuple, list[jax.Array]] = {}
  for batch in batches:
    for key, value in ranges_of(params, batch).items():
      seen.setdefault(key, []).append(value)
  if not seen:
    raise ValueError('activation calibration saw no batch (config.quant_calibration.examples '
                     'too small?)')
  combine = jnp.max if cfg.calibration == 'absmax' else jnp.mean
  return {key: combine(jnp.stack(values)) for key, values in seen.items()}

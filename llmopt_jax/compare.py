"""Comparing model variants in one table: parameters, bytes, quality and measured latency.

Bytes are summed over the arrays actually held (their dtypes as stored), not computed from a
formula. Latency is the wall time of a jitted deterministic forward pass on one device, per
query, at a given batch size: batch 1 is what an interactive request pays, batch 64 what a
batch job pays per query once the matmuls are wide enough to use the machine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from llmopt_jax import perf

LATENCY_BATCH_SIZES = (1, 64)


def size_of(params: Any) -> tuple[int, int]:
  """(number of parameters, bytes) of a parameter tree, from its arrays."""
  leaves = jax.tree.leaves(params)
  return sum(int(np.prod(x.shape)) for x in leaves), sum(int(x.nbytes) for x in leaves)


def latency_per_query(
    graphdef: nnx.GraphDef, params: Any, forward: Callable[[nnx.Module, dict], jax.Array],
    make_batch: Callable[[int], dict], batch_sizes: Sequence[int] = LATENCY_BATCH_SIZES,
    repeats: int = 10) -> dict[int, float]:
  """Seconds per query of `forward(model, batch)` at each batch size, on the first device.

  The parameters are copied to one device first: a per-query latency is a single-device
  figure, and a batch of one cannot be split over a data-parallel mesh anyway.
  """
  device = jax.local_devices()[0]
  # Arrays split over several processes are gathered first (a collective: every process
  # calls this); then each process times its own copy.
  params = jax.tree.map(
      lambda x: x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True),
      params)
  params = jax.device_put(params, device)

  @jax.jit
  def run(params, batch):
    return forward(nnx.merge(graphdef, params), batch)

  out = {}
  for size in batch_sizes:
    batch = jax.device_put(make_batch(size), device)
    # The best of `repeats`: on a shared machine the least-disturbed run is the reproducible one.
    out[size] = perf.time_fn(run, params, batch, warmup=2, repeats=repeats, stat=min) / size
  return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ['| ' + ' | '.join(headers) + ' |', '|' + ' --- |' * len(headers)]
  lines += ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'

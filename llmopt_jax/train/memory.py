"""Per-device memory of the train state and of the compiled step: what a mesh buys.

Parameters and optimizer state are counted from their shardings before anything is allocated
(each array's shard shape times its item size), so a user sees, at start-up, what FSDP or
tensor parallelism saves on each device. The compiled step adds XLA's own account of its
arguments, outputs and temporaries (activations, gathered weights, gradients); XLA compiles
one program per device under SPMD, so its figures are per device too.

  print(memory.report(abstract_state, train_step.lower(state, batch, None).compile()))
"""

from __future__ import annotations

import math
from typing import Any

import jax

# XLA's CompiledMemoryStats fields, as (our name, attribute).
_COMPILED_FIELDS = (
    ('argument', 'argument_size_in_bytes'),
    ('output', 'output_size_in_bytes'),
    ('alias', 'alias_size_in_bytes'),
    ('temp', 'temp_size_in_bytes'),
)


def tree_bytes(tree: Any) -> tuple[int, int]:
  """(bytes on one device, bytes of the whole tree) for arrays or ShapeDtypeStructs.

  A leaf without a sharding counts whole on every device. The shards of a NamedSharding over
  dimensions that divide (`sharding.check_divisible`) all have one shape, so one device's
  bytes are also the maximum over devices.
  """
  per_device = total = 0
  for leaf in jax.tree.leaves(tree):
    itemsize = leaf.dtype.itemsize
    shard = leaf.shape if getattr(leaf, 'sharding', None) is None else (
        leaf.sharding.shard_shape(leaf.shape))
    per_device += math.prod(shard) * itemsize
    total += math.prod(leaf.shape) * itemsize
  return per_device, total


def compiled_bytes(compiled: Any) -> dict[str, int] | None:
  """Per-device argument/output/alias/temp bytes of a compiled executable; None if the
  backend does not report them."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return {name: int(getattr(analysis, attr, 0) or 0) for name, attr in _COMPILED_FIELDS}


def memory(abstract_state: Any, compiled: Any = None) -> dict[str, Any]:
  """Bytes per device and in total of `params` and `opt_state` (a TrainState of arrays or of
  ShapeDtypeStructs with shardings), and the compiled step's bytes when it is given."""
  params, params_total = tree_bytes(abstract_state.params)
  opt_state, opt_state_total = tree_bytes(abstract_state.opt_state)
  return {
      'params': params,
      'params_total': params_total,
      'opt_state': opt_state,
      'opt_state_total': opt_state_total,
      'compiled': None if compiled is None else compiled_bytes(compiled),
  }


def format_bytes(n: float) -> str:
  for scale, unit in ((2**40, 'TiB'), (2**30, 'GiB'), (2**20, 'MiB'), (2**10, 'KiB')):
    if abs(n) >= scale:
      return f'{n / scale:.3g} {unit}'
  return f'{int(n)} B'


def report(abstract_state: Any, compiled: Any = None) -> str:
  """`memory(...)` as a small table: per device, whole, and the fraction each device holds."""
  m = memory(abstract_state, compiled)
  rows = [('memory', 'per device', 'whole', 'share')]
  for name, key in (('parameters', 'params'), ('optimizer state', 'opt_state')):
    per_device, total = m[key], m[f'{key}_total']
    share = f'1/{total / per_device:.3g}' if per_device else '-'
    rows.append((name, format_bytes(per_device), format_bytes(total), share))
  widths = [max(len(row[i]) for row in rows) for i in range(4)]
  lines = [f'{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}'
           for r in rows]
  if compiled is not None:
    c = m['compiled']
    lines.append('train step per device: ' + (
        'not reported by this backend' if c is None else
        f'arguments {format_bytes(c["argument"])}, outputs {format_bytes(c["output"])} '
        f'({format_bytes(c["alias"])} reuse argument buffers), '
        f'temporaries {format_bytes(c["temp"])}'))
  return '\n'.join(lines)

"""Logical axis names, the rules that map them to mesh axes, and the shardings they imply.

The model names the axes of every parameter and of a few key activations with a small
vocabulary (below). Which mesh axis, if any, each logical axis is split over is a table in
the config (`config.mesh.rules`), so changing the parallelism never touches the model.

Logical axes:
  batch     examples in a batch           length    positions in a sequence
  embed     model width (d_model)         mlp       MLP hidden width
  heads     query heads                   kv_heads  key/value heads
  kv        width of one attention head   vocab     vocabulary entries
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_AXES = ('batch', 'length', 'embed', 'mlp', 'heads', 'kv_heads', 'kv', 'vocab')

# A rules table maps each logical axis to a mesh axis, a tuple of mesh axes, or None.
Rules = Mapping[str, str | Sequence[str] | None]

# Everything replicated except the batch, which is split over every data-like axis.
DATA_PARALLEL_RULES: dict[str, str | tuple[str, ...] | None] = {
    'batch': ('data', 'fsdp'),
    'length': None,
    'embed': None,
    'mlp': None,
    'heads': None,
    'kv_heads': None,
    'kv': None,
    'vocab': None,
}


def logical_to_spec(axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """Translates logical axis names into a PartitionSpec, failing on unknown names."""
  spec = []
  for axis in axes:
    if axis is None:
      spec.append(None)
      continue
    if axis not in rules:
      raise ValueError(
          f'logical axis {axis!r} has no entry in the sharding rules; known: {sorted(rules)}')
    mesh_axes = rules[axis]
    spec.append(tuple(mesh_axes) if isinstance(mesh_axes, (list, tuple)) else mesh_axes)
  return PartitionSpec(*spec)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with the named axes of `shape`; one axis may be -1 meaning 'the rest'."""
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(shape)
  sizes = [int(s) for s in shape.values()]
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh.shape: at most one axis may be -1, got {dict(shape)}')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
          f'config.mesh.shape {dict(shape)} does not divide the {len(devices)} devices')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
        f'config.mesh.shape {dict(shape)} needs {int(np.prod(sizes))} devices, '
        f'but {len(devices)} are available')
  return Mesh(np.asarray(devices).reshape(sizes), names)


@dataclasses.dataclass(frozen=True)
class _Active:
  mesh: Mesh
  rules: Rules


_active = threading.local()


@contextlib.contextmanager
def use(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Makes `constrain` place activations on `mesh` according to `rules` while tracing."""
  previous = getattr(_active, 'value', None)
  _active.value = _Active(mesh, rules)
  try:
    yield
  finally:
    _active.value = previous


def active() -> tuple[Mesh, Rules] | None:
  """The (mesh, rules) of the enclosing `use(...)`, or None outside one."""
  current = getattr(_active, 'value', None)
  return None if current is None else (current.mesh, current.rules)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Pins an activation's sharding by logical axes; a no-op outside `use(...)`."""
  active = getattr(_active, 'value', None)
  if active is None:
    return x
  spec = logical_to_spec(axes, active.rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(active.mesh, spec))


def param_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
  """The logical axes a parameter was annotated with (empty for scalars)."""
  axes = variable.get_metadata().get('out_sharding')
  return tuple(axes) if axes else (None,) * np.ndim(variable.get_value())


def tree_shardings(abstract_tree, mesh: Mesh, rules: Rules):
  """NamedShardings for a pytree holding NNX variables (params, optimizer state, ...).

  A variable is split by its logical axes; any other leaf (a step counter, a scalar of the
  optimizer state) is replicated. Optax keeps the variable wrappers of the parameters in its
  moment estimates, so the optimizer state inherits the parameters' shardings for free. The
  result has the structure of `abstract_tree` (variables keep their wrappers), so it can be
  zipped with it leaf by leaf.
  """
  def to_sharding(leaf):
    if isinstance(leaf, nnx.Variable):
      return leaf.replace(NamedSharding(mesh, logical_to_spec(param_axes(leaf), rules)))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(
      to_sharding, abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Examples split over the data-like mesh axes, everything else replicated."""
  return NamedSharding(mesh, logical_to_spec(('batch',), rules))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict:
  """Assembles this process's slice of a batch into global arrays split along the batch."""
  sharding = batch_sharding(mesh, rules)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

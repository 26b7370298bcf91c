"""Logical axis names, the rules that map them to mesh axes, and the shardings they imply.

The model names the axes of every parameter and of a few key activations with a small
vocabulary (below). Which mesh axes, if any, each logical axis is split over is a table in
the config (`config.mesh.rules`), so changing the parallelism never touches the model.

Logical axes:
  batch     examples in a batch           length    positions in a sequence
  embed     model width (d_model)         mlp       MLP hidden width
  heads     query heads                   kv_heads  key/value heads
  kv        width of one attention head   vocab     vocabulary entries

One table serves weights and activations: an array's dimensions claim mesh axes first come,
first served, so with {batch: (data, fsdp), embed: fsdp} a weight [embed, mlp] is split over
fsdp while the residual stream [batch, length, embed] spends fsdp on the batch (Flax's
logical partitioning resolves a conflict the same way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

LOGICAL_AXES = ('batch', 'length', 'embed', 'mlp', 'heads', 'kv_heads', 'kv', 'vocab')

# Mesh axes, outermost first. `mesh_utils` gives the last axes the nearest devices, so tensor
# parallelism (two all-reduces per block) goes last and data parallelism (one per step) first.
# The order is fixed here because ml_collections sorts a ConfigDict's keys: the order of
# `config.mesh.shape` cannot carry it.
MESH_AXES = ('data', 'fsdp', 'tensor')

# A rules table maps each logical axis to a tuple of mesh axes (empty: not split). A bare
# string or None is accepted too; configs keep tuples so the command line can override them.
Rules = Mapping[str, str | Sequence[str | None] | None]


def _rules(**split: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
  return {axis: split.get(axis, ()) for axis in LOGICAL_AXES}


_BATCH = ('data', 'fsdp')
_MEGATRON = dict(heads=('tensor',), kv_heads=('tensor',), mlp=('tensor',), vocab=('tensor',))

# Everything replicated except the batch, which is split over every data-like axis.
DATA_PARALLEL_RULES = _rules(batch=_BATCH)

# name -> (config.mesh.shape, config.mesh.rules). -1 is "the remaining devices".
MESH_PRESETS: dict[str, tuple[dict[str, int], dict[str, tuple[str, ...]]]] = {
    # Plain data parallelism: every device holds the whole state.
    'data': ({'data': -1, 'fsdp': 1, 'tensor': 1}, DATA_PARALLEL_RULES),
    # ZeRO-3 (Rajbhandari et al. 2020): every matrix has an `embed` dimension, so splitting it
    # splits all parameters and, as Adam's moments carry their parameter's axes, the optimizer
    # state; the compiler gathers a layer's weights just before it is used.
    'fsdp': ({'data': 1, 'fsdp': -1, 'tensor': 1}, _rules(batch=_BATCH, embed=('fsdp',))),
    # Megatron (Shoeybi et al. 2019): q/k/v and gate/up split by columns (heads, mlp), o and
    # down by rows, so each attention and MLP block needs one all-reduce of its output.
    'tensor': ({'data': 1, 'fsdp': 1, 'tensor': -1}, _rules(batch=_BATCH, **_MEGATRON)),
    # Both: weights split two ways, tensor kept at 2 so the heads still divide.
    'fsdp_tensor': ({'data': 1, 'fsdp': -1, 'tensor': 2},
                    _rules(batch=_BATCH, embed=('fsdp',), **_MEGATRON)),
}


def mesh_axes_of(value: str | Sequence[str | None] | None) -> tuple[str, ...]:
  """One rule's mesh axes as a tuple. None and '' entries (what `--config.mesh.rules.x=None`
  and `--config.mesh.rules.x=` parse to) mean "not split"."""
  values = (value,) if value is None or isinstance(value, str) else tuple(value)
  return tuple(v for v in values if v)


def logical_to_spec(axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """A PartitionSpec for logical `axes`; a mesh axis taken by an earlier dimension is skipped.

  Fails on a logical axis the rules do not name.
  """
  taken: set[str] = set()
  spec = []
  for axis in axes:
    if axis is not None and axis not in rules:
      raise ValueError(
          f'logical axis {axis!r} has no entry in the sharding rules; known: {sorted(rules)}')
    free = tuple(a for a in mesh_axes_of(rules[axis] if axis else None) if a not in taken)
    taken.update(free)
    spec.append(None if not free else free[0] if len(free) == 1 else free)
  return PartitionSpec(*spec)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              dcn_shape: Mapping[str, int] | None = None) -> Mesh:
  """The mesh `shape` (axis -> size; one -1 = "the rest"; a missing axis has size 1).

  `dcn_shape` (axis -> number of slices) spreads those axes over TPU slices, or over processes
  where devices have no slice index (GPU hosts), linked by the slower data-center network.
  """
  devices = list(jax.devices() if devices is None else devices)
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f'config.mesh.shape: unknown mesh axes {unknown}; axes: {MESH_AXES}')
  sizes = [int(shape.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.mesh.shape {dict(shape)}: sizes must be >= 1, one may be -1')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
          f'config.mesh.shape {dict(shape)} does not divide the {len(devices)} devices')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f'config.mesh.shape {dict(shape)} needs {math.prod(sizes)} devices, '
                     f'but {len(devices)} are available')
  dcn = _dcn_sizes(dcn_shape or {}, sizes)
  if math.prod(dcn) == 1:
    # Auto axes: the compiler propagates shardings from the jit boundary and `constrain`
    # (jax.make_mesh's default, Explicit, would put shardings into the types instead).
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(sizes),
                         devices=devices)
  return Mesh(hybrid_device_grid(sizes, dcn, devices), MESH_AXES)


def _dcn_sizes(dcn_shape: Mapping[str, int], sizes: Sequence[int]) -> list[int]:
  unknown = sorted(set(dcn_shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f'config.mesh.dcn_shape: unknown mesh axes {unknown}; axes: {MESH_AXES}')
  dcn = [int(dcn_shape.get(name, 1)) for name in MESH_AXES]
  if any(d < 1 or s % d for s, d in zip(sizes, dcn)):
    raise ValueError(f'config.mesh.dcn_shape {dict(dcn_shape)} must divide the mesh axes '
                     f'{dict(zip(MESH_AXES, sizes))}')
  return dcn


def hybrid_device_grid(sizes: Sequence[int], dcn: Sequence[int], devices: Sequence) -> np.ndarray:
  """Devices laid out so each slice (or process) is a contiguous block of the DCN axes."""
  ici = [s // d for s, d in zip(sizes, dcn)]
  by_slice = len({getattr(d, 'slice_index', 0) for d in devices}) > 1
  try:
    return mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=not by_slice)
  except ValueError as e:
    raise ValueError(f'config.mesh.dcn_shape {dict(zip(MESH_AXES, dcn))}: {e}') from None


def from_config(mesh_config, devices: Sequence[jax.Device] | None = None
                ) -> tuple[Mesh, dict[str, tuple[str, ...]]]:
  """The mesh of a `config.mesh` section (shape, rules, dcn_shape) and its rules as tuples."""
  mesh = make_mesh(mesh_config.shape, devices, mesh_config.get('dcn_shape'))
  rules = {logical: mesh_axes_of(value) for logical, value in mesh_config.rules.items()}
  check_rules(mesh, rules)
  return mesh, rules


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


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def check_rules(mesh: Mesh, rules: Rules) -> None:
  """Every mesh axis the rules name exists in `mesh`."""
  for logical, value in rules.items():
    unknown = [a for a in mesh_axes_of(value) if a not in mesh.shape]
    if unknown:
      raise ValueError(f'config.mesh.rules.{logical} names mesh axes {unknown}; the mesh has '
                       f'{tuple(mesh.shape)}')


def check_divisible(abstract_tree, mesh: Mesh, rules: Rules) -> None:
  """Every split dimension of every variable in the tree divides over its mesh axes."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract_tree, is_leaf=_is_variable)[0]
  for path, leaf in leaves:
    if not _is_variable(leaf):
      continue
    axes = param_axes(leaf)
    shape = leaf.get_value().shape
    for dim, (logical, split) in enumerate(zip(axes, logical_to_spec(axes, rules))):
      split = mesh_axes_of(split)
      size = math.prod(mesh.shape[a] for a in split)
      if shape[dim] % size:
        name = jax.tree_util.keystr(path, simple=True, separator='/')
        raise ValueError(
            f'parameter {name} dim {dim} ({logical}={shape[dim]}) does not divide over mesh '
            f'axes {split} of size {size}; change config.mesh.shape or '
            f'config.mesh.rules.{logical}')


def check_batch(batch_size: int, mesh: Mesh, rules: Rules, num_micro_batches: int = 1) -> None:
  """The global batch, and each micro-batch of it, divides over the batch's mesh axes."""
  check_rules(mesh, rules)
  split = mesh_axes_of(logical_to_spec(('batch',), rules)[0])
  size = math.prod(mesh.shape[a] for a in split)
  if batch_size % num_micro_batches:
    raise ValueError(f'config.train.batch_size={batch_size} does not divide into '
                     f'config.train.num_micro_batches={num_micro_batches}')
  micro = batch_size // num_micro_batches
  if micro % size:
    what = (f'config.train.batch_size={batch_size}' if num_micro_batches == 1 else
            f'a micro-batch of {micro} (config.train.batch_size={batch_size} / '
            f'config.train.num_micro_batches={num_micro_batches})')
    raise ValueError(f'{what} does not divide over the batch mesh axes {split} of size '
                     f'{size} (config.mesh.shape {dict(mesh.shape)})')


def tree_shardings(abstract_tree, mesh: Mesh, rules: Rules):
  """NamedShardings for a pytree holding NNX variables (params, optimizer state, ...).

  A variable is split by its logical axes; any other leaf (a step counter, a scalar of the
  optimizer state) is replicated. Optax keeps the variable wrappers of the parameters in its
  moment estimates, so the optimizer state inherits the parameters' shardings for free. The
  result has the structure of `abstract_tree` (variables keep their wrappers), so it can be
  zipped with it leaf by leaf. A rule naming a missing mesh axis, or a split dimension that
  does not divide, fails here with the parameter named.
  """
  check_rules(mesh, rules)
  check_divisible(abstract_tree, mesh, rules)

  def to_sharding(leaf):
    if _is_variable(leaf):
      return leaf.replace(NamedSharding(mesh, logical_to_spec(param_axes(leaf), rules)))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(to_sharding, abstract_tree, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Examples split over the data-like mesh axes, everything else replicated."""
  return NamedSharding(mesh, logical_to_spec(('batch',), rules))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict:
  """Assembles this process's slice of a batch into global arrays split along the batch."""
  sharding = batch_sharding(mesh, rules)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

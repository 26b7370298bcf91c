"""Structured pruning: whole attention groups and MLP neurons out of every block.

Unstructured masks (`masks.py`) zero single weights; the matrices keep their shape and a dense
kernel spends the same bytes and FLOPs on the zeros. Removing whole units instead leaves a
smaller dense transformer that ordinary dense kernels run faster (Michel et al. 2019, "Are Sixteen
Heads Really Better than One?"; Ma et al. 2023, LLM-Pruner). The units:

  group   one key/value group: its k and v slices (and k_bias, v_bias) and its G = N / K
          query heads (their q and q_bias slices and their rows of o). With MHA (N == K:
          BERT, MiniLM, GPT-2) a group is one head. Query head n belongs to group n // G.
  neuron  one hidden unit of the MLP: column f of gate and up (and up_bias), row f of down.

Every block keeps the same number of groups and of neurons, so the sliced model is again a
uniform `TransformerConfig`, with fewer num_heads, num_kv_heads and mlp_dim. Everything else
(embeddings, norms, o_bias, down_bias, the LM head, pooler and classifier) is untouched.

  group_scores, neuron_scores   weight-magnitude importance of each unit, per block
  plan                          which units each block keeps (the highest-scoring)
  mask                          the same shapes with the pruned units' weights exactly 0
  slice_model                   the smaller matrices, and the config that builds their model

The masked and the sliced model compute the same function: a masked group's queries, keys and
values are 0 and so are its rows of o, a masked neuron's hidden activation is act(0) * 0 = 0
(GELU and SiLU map 0 to 0) and its row of down is 0, so the removed units add exact zeros to
sums the sliced model simply does not have.

A parameter's unit axis is read from its logical axis names (`sharding.param_axes`): 'heads'
are query heads, 'kv_heads' groups, 'mlp' neurons. These are the names the sharding rules
split, so every projection and bias a family has is found without a table of paths, and the
sliced parameters keep their names and shard like the originals (a reduced size must still
divide its mesh axes: `sharding.check_divisible` names the parameter that does not).

Axis letters: D embed   N query heads   K kv groups   G = N // K   H head dim   F mlp hidden
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmopt_jax import sharding
from llmopt_jax.models.config import TransformerConfig

Path = tuple[Any, ...]
# The logical axes whose entries are units: query heads (which follow their group), kv groups
# and MLP neurons.
_UNIT_AXES = ('heads', 'kv_heads', 'mlp')


@dataclasses.dataclass(frozen=True)
class Plan:
  """Kept indices per block: kept_groups[l] (sorted kv-group indices of block l), kept_neurons[l]
  (sorted). Every block keeps as many groups, and as many neurons, as every other."""

  kept_groups: tuple[tuple[int, ...], ...]
  kept_neurons: tuple[tuple[int, ...], ...]

  def __post_init__(self):
    if len(self.kept_groups) != len(self.kept_neurons):
      raise ValueError(f'Plan has {len(self.kept_groups)} blocks of groups but '
                       f'{len(self.kept_neurons)} of neurons')
    for name in ('kept_groups', 'kept_neurons'):
      blocks = getattr(self, name)
      if len({len(kept) for kept in blocks}) > 1:
        raise ValueError(f'Plan.{name} keeps {sorted({len(k) for k in blocks})} units in '
                         f'different blocks; a uniform config needs one count')
      for kept in blocks:
        if not kept or list(kept) != sorted(set(kept)) or kept[0] < 0:
          raise ValueError(f'Plan.{name} has {kept}; each block needs sorted, distinct, '
                           f'non-negative indices, at least one')


def _unit_axis(variable: nnx.Variable) -> tuple[int, str] | None:
  """(axis, logical name) of the parameter's unit axis, None for a parameter without one."""
  axes = sharding.param_axes(variable)
  found = [(i, a) for i, a in enumerate(axes) if a in _UNIT_AXES]
  assert len(found) <= 1, f'a parameter with two unit axes: {axes}'
  return found[0] if found else None


def _block_of(path: Path) -> int | None:
  """The block index of a parameter path (`backbone/blocks/3/attn/q` -> 3), None outside."""
  return path[path.index('blocks') + 1] if 'blocks' in path else None


def _blocks(params: nnx.State, config: TransformerConfig) -> list[dict[Path, nnx.Variable]]:
  """Each block's parameters by their path inside the block (('attn', 'q'), ...), in order."""
  blocks: dict[int, dict[Path, nnx.Variable]] = {}
  for path, variable in nnx.to_flat_state(params):
    block = _block_of(path)
    if block is not None:
      inner = path[path.index('blocks') + 2:]
      blocks.setdefault(block, {})[inner] = variable
  if sorted(blocks) != list(range(config.num_layers)):
    raise ValueError(f'params hold blocks {sorted(blocks)}, but TransformerConfig.num_layers '
                     f'is {config.num_layers}')
  return [blocks[i] for i in range(config.num_layers)]


def _squares(variable: nnx.Variable) -> np.ndarray:
  """Sum of squares of each unit's slice of a parameter (over every other axis), float32."""
  unit = _unit_axis(variable)
  if unit is None:
    raise ValueError(f'a scored parameter {variable.get_value().shape} has no logical axis '
                     f'{_UNIT_AXES}; keep the nnx.Param wrappers: nnx.state(model, nnx.Param)')
  axis, _ = unit
  x = jnp.asarray(variable.get_value(), jnp.float32)
  others = tuple(i for i in range(x.ndim) if i != axis)
  return np.asarray(jnp.sum(jnp.square(x), axis=others))


def group_scores(params: nnx.State, config: TransformerConfig) -> list[np.ndarray]:
  """Per block, [K]: the L2 norm of each group's weights in q, k, v and o (biases aside).

  Magnitude is the data-free importance of Michel et al. and LLM-Pruner's weight criterion: a
  group whose weights are small moves the residual stream little."""
  g = config.num_heads // config.num_kv_heads
  scores = []
  for block in _blocks(params, config):
    heads = _squares(block['attn', 'q']) + _squares(block['attn', 'o'])  # [N]
    groups = _squares(block['attn', 'k']) + _squares(block['attn', 'v'])  # [K]
    scores.append(np.sqrt(groups + heads.reshape(-1, g).sum(axis=1)))
  return scores


def neuron_scores(params: nnx.State, config: TransformerConfig) -> list[np.ndarray]:
  """Per block, [F]: the L2 norm of each neuron's input weights (its gate and up columns
  together) times the L2 norm of its output weights (its row of down).

  A product, not a sum: a neuron whose input is large but whose output is near 0 (or the
  reverse) contributes little, and the product does not change when a rescaling moves weight
  between the two sides (as for a ReLU-like unit)."""
  scores = []
  for block in _blocks(params, config):
    inputs = sum(_squares(block['mlp', name]) for name in ('gate', 'up')
                 if ('mlp', name) in block)
    scores.append(np.sqrt(inputs) * np.sqrt(_squares(block['mlp', 'down'])))
  return scores


def _keep(scores: Sequence[np.ndarray], fraction: float, field: str,
          unit: str) -> tuple[tuple[int, ...], ...]:
  """Per block, the sorted indices left after removing round(fraction * count) lowest scores."""
  if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not (
      0.0 <= fraction < 1.0):
    raise ValueError(f'config.prune.{field}={fraction!r}; must lie in [0, 1)')
  kept = []
  for block_scores in scores:
    block_scores = np.asarray(block_scores)
    count = block_scores.size
    drop = round(fraction * count)  # Python's round: halves go to even (2.5 -> 2)
    if drop >= count:
      raise ValueError(f'config.prune.{field}={fraction!r} would remove every {unit} of a '
                       f'block (round({fraction!r} * {count}) = {drop})')
    # A stable sort: among equal scores the lower index goes first, so ties never change
    # which units go from one run to the next.
    order = np.argsort(block_scores, kind='stable')
    kept.append(tuple(sorted(int(i) for i in order[drop:])))
  return tuple(kept)


def plan(group_scores: Sequence[np.ndarray], neuron_scores: Sequence[np.ndarray], *,
         heads_fraction: float, neurons_fraction: float) -> Plan:
  """Keeps the highest-scoring units of each block, removing round(fraction * count).

  `heads_fraction` is the share of kv groups removed (and so of query heads, G per group);
  `neurons_fraction` the share of MLP neurons. Each must lie in [0, 1) and leave every block
  at least one unit of each kind; the errors name the `config.prune` field."""
  return Plan(_keep(group_scores, heads_fraction, 'heads_fraction', 'attention head'),
              _keep(neuron_scores, neurons_fraction, 'neurons_fraction', 'MLP neuron'))


def _kept_indices(config: TransformerConfig, plan: Plan, block: int,
                  axis_name: str) -> np.ndarray:
  """The indices a block keeps along a unit axis: groups, their query heads, or neurons."""
  if axis_name == 'mlp':
    return np.asarray(plan.kept_neurons[block])
  groups = np.asarray(plan.kept_groups[block])
  if axis_name == 'kv_heads':
    return groups
  g = config.num_heads // config.num_kv_heads
  return (groups[:, None] * g + np.arange(g)).reshape(-1)  # query head n = k * G + g


def _check(config: TransformerConfig, plan: Plan) -> None:
  """The plan fits the config: one entry per block, no index past the units there are."""
  if len(plan.kept_groups) != config.num_layers:
    raise ValueError(f'the plan has {len(plan.kept_groups)} blocks, TransformerConfig.'
                     f'num_layers is {config.num_layers}')
  for name, count, field in (('kept_groups', config.num_kv_heads, 'num_kv_heads'),
                             ('kept_neurons', config.mlp_dim, 'mlp_dim')):
    largest = max(kept[-1] for kept in getattr(plan, name))
    if largest >= count:
      raise ValueError(f'Plan.{name} keeps index {largest}, but TransformerConfig.{field} '
                       f'is {count}')


def _edit(params: nnx.State, config: TransformerConfig, plan: Plan,
          edit: Callable[[jax.Array, int, np.ndarray], jax.Array]) -> nnx.State:
  """`params` with edit(value, unit axis, kept indices) applied to every block parameter that
  has a unit axis; every other parameter is passed through as it is."""
  _check(config, plan)
  sizes = {'heads': config.num_heads, 'kv_heads': config.num_kv_heads, 'mlp': config.mlp_dim}
  flat = []
  for path, variable in nnx.to_flat_state(params):
    block, unit = _block_of(path), _unit_axis(variable)
    if block is not None and not any(sharding.param_axes(variable)):
      raise ValueError(f'parameter {"/".join(map(str, path))} carries no logical axes; '
                       f'structured pruning finds the units by them (keep the nnx.Param '
                       f'wrappers: nnx.state(model, nnx.Param))')
    if block is not None and unit is not None:
      axis, axis_name = unit
      value = variable.get_value()
      if value.shape[axis] != sizes[axis_name]:
        raise ValueError(f'parameter {"/".join(map(str, path))} has {value.shape[axis]} '
                         f'{axis_name}, the config {sizes[axis_name]}')
      variable = variable.replace(edit(value, axis, _kept_indices(config, plan, block,
                                                                  axis_name)))
    flat.append((path, variable))
  return nnx.from_flat_state(flat)


def _zero_all_but(value: jax.Array, axis: int, kept: np.ndarray) -> jax.Array:
  """`value` with every slice along `axis` outside `kept` exactly 0 (a select, not a product
  with a 0/1 mask, so that an inf or NaN in a removed unit does not survive as NaN)."""
  keep = np.zeros(value.shape[axis], bool)
  keep[kept] = True
  shape = [1] * value.ndim
  shape[axis] = -1
  return jnp.where(keep.reshape(shape), value, jnp.zeros((), value.dtype))


def mask(params: nnx.State, config: TransformerConfig, plan: Plan) -> nnx.State:
  """The same shapes with the pruned units' weights and biases set to exactly 0: the model
  that `slice_model` makes smaller, for comparison and for training before slicing."""
  return _edit(params, config, plan, _zero_all_but)


def slice_model(params: nnx.State, config: TransformerConfig,
                plan: Plan) -> tuple[TransformerConfig, nnx.State]:
  """(the smaller config, its parameters): each block's matrices and biases keep only the
  planned units, in their original order; every other parameter is the same array.

  The config is that of `params`' backbone (`SequenceClassifier` builds on it again)."""
  sliced = _edit(params, config, plan,
                 lambda value, axis, kept: jnp.take(value, jnp.asarray(kept), axis=axis))
  groups, neurons = len(plan.kept_groups[0]), len(plan.kept_neurons[0])
  g = config.num_heads // config.num_kv_heads
  smaller = config.replace(num_heads=groups * g, num_kv_heads=groups, mlp_dim=neurons)
  return smaller, sliced

"""A model of ours from a Hugging Face checkpoint directory, placed on the mesh as it loads.

The model is first built abstractly (`nnx.eval_shape`: shapes and logical axes, no memory).
The checkpoint's names and shapes are then checked against it from the file headers alone, so
a missing, unexpected or wrongly shaped tensor fails before anything is read. Each tensor is
then read, converted to our layout and `param_dtype` on the host, and put on the sharding its
logical axes map to (`jax.device_put`) before the next one is read: a host holds one tensor
beyond the memory-mapped file, and each device only its shards.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from llmopt_jax import sharding
from llmopt_jax.hf import checkpoint, configs, layouts
from llmopt_jax.models.config import TransformerConfig
from llmopt_jax.models.heads import HeadConfig, SequenceClassifier
from llmopt_jax.models.transformer import Transformer


def read_config(path: str) -> dict[str, Any]:
  """The `config.json` next to a checkpoint (a directory or a file in it)."""
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  file = os.path.join(directory, 'config.json')
  if not os.path.exists(file):
    raise FileNotFoundError(f'{directory}: no config.json (a Hugging Face model directory has '
                            f'config.json and model.safetensors)')
  return checkpoint.read_json(file)  # malformed JSON fails naming the file, line and column


def build(config: TransformerConfig, head: HeadConfig | None, rngs: nnx.Rngs) -> nnx.Module:
  """`Transformer(config)`, or a `SequenceClassifier` on it when `head` is given."""
  if head is None:
    return Transformer(config, rngs=rngs)
  return SequenceClassifier(config, head.num_labels, pooling=head.pooling, rngs=rngs)


def _name(path: tuple) -> str:
  return '/'.join(map(str, path))


# Names that early BERT checkpoints (converted from TensorFlow) still use, renamed on load by
# transformers as well.
_LEGACY_NAMES = (('LayerNorm.gamma', 'LayerNorm.weight'), ('LayerNorm.beta', 'LayerNorm.bias'))


def _plan(reader: checkpoint.Reader, prefix: str, table: list[layouts.Tensor],
          inactive: set[str]) -> tuple[dict[str, str], set[str]]:
  """(canonical name -> file name of every tensor to load, head groups to initialise).

  Canonical names drop the base-model prefix (`model.`, `transformer.`, `bert.`), so the
  checkpoints of a base model and of its task classes read alike, and modernise legacy names.
  """
  files = {}
  for name in reader.names():
    canonical = name[len(prefix) + 1:] if name.startswith(prefix + '.') else name
    for legacy, current in _LEGACY_NAMES:
      if canonical.endswith(legacy):
        canonical = canonical[:-len(legacy)] + current
    files[canonical] = name
  wanted = {t.hf for t in table}
  dropped = [n for n in files if n not in wanted and (
      n in inactive or n.endswith(layouts.IGNORED_SUFFIXES) or
      n.startswith(layouts.IGNORED_PREFIXES))]
  unexpected = sorted(set(files) - wanted - set(dropped))
  if unexpected:
    more = f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''
    raise ValueError(f'{reader.path}: unexpected tensor {files[unexpected[0]]}{more}; it has no '
                     f'place in this model')
  if dropped:
    logging.info('%s: not loading %d tensors this model has no use for: %s', reader.path,
                 len(dropped), ', '.join(sorted(dropped)))
  # A head group the checkpoint has none of is a new head (fine-tuning a base model).
  fresh = {t.group for t in table if t.group in ('pooler', 'classifier')} - {
      t.group for t in table if t.hf in files}
  missing = [t for t in table if t.hf not in files and t.group not in fresh]
  if missing:
    t = missing[0]
    more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    prefixed = t.in_base and any(n.startswith(prefix + '.') for n in files.values())
    hf = f'{prefix}.{t.hf}' if prefixed else t.hf
    raise ValueError(f'{reader.path}: missing tensor {hf} for parameter {_name(t.ours[0])}{more}')
  return {t.hf: files[t.hf] for t in table if t.hf in files}, fresh


def load_pretrained(path: str, *, mesh: jax.sharding.Mesh | None = None,
                    rules: sharding.Rules | None = None, head: HeadConfig | None = None,
                    seed: int = 0, **overrides: Any) -> tuple[nnx.Module, TransformerConfig]:
  """(model, config) from an HF directory (`config.json` + safetensors).

  Args:
    path: the directory (or its `.safetensors` file; sharded checkpoints need the directory).
    mesh, rules: place the parameters on `mesh` by their logical axes under `rules` (default:
      replicated); without a mesh they go to the default device.
    head: a classification head. Default: the checkpoint's own (a *ForSequenceClassification
      has one, other classes none). A head the checkpoint has no weights for (fine-tuning a
      base model) is initialised from `seed`, as is BERT's pooler when it is absent.
    overrides: TransformerConfig fields to change, e.g. param_dtype='bfloat16' (tensors are
      converted to it as they load) or dropout_rate=0.0.
  Returns:
    A `Transformer` or `SequenceClassifier`, and the (backbone) config.
  """
  config, hf_head = configs.from_hf(read_config(path))
  config = config.replace(**overrides) if overrides else config
  head = head or hf_head
  if head is not None:
    config = config.replace(lm_head=False)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(config, head, nnx.Rngs(seed))))
  params = dict(nnx.to_flat_state(abstract))  # path -> abstract Param
  shardings = None if mesh is None else dict(nnx.to_flat_state(sharding.tree_shardings(
      abstract, mesh, sharding.DATA_PARALLEL_RULES if rules is None else rules)))

  def place(path: tuple, array: Any) -> jax.Array:
    return jax.device_put(array, None if shardings is None else shardings[path].get_value())
  everything = layouts.tensors(config, head)
  table = [t for t in everything if all(p in params for p in t.ours)]
  inactive = {t.hf for t in everything} - {t.hf for t in table}
  assert {p for t in table for p in t.ours} == set(params), 'layout table out of date'

  values = {}
  dtype = jnp.dtype(config.param_dtype)
  with checkpoint.Reader(path) as reader:
    files, fresh = _plan(reader, layouts.PREFIX[config.family], table, inactive)
    loads = [t for t in table if t.hf in files]
    for t in loads:  # every shape is checked before the first tensor is read
      want = layouts.hf_shape(t, [params[p].get_value().shape for p in t.ours])
      got = reader.shape(files[t.hf])
      if got != want:
        raise ValueError(f'{path}: tensor {files[t.hf]} has shape {got}, expected {want} for '
                         f'parameter {_name(t.ours[0])}')
    for t in loads:
      shapes = [params[p].get_value().shape for p in t.ours]
      for p, array in zip(t.ours, layouts.to_ours(t, reader.get(files[t.hf]), shapes)):
        values[p] = place(p, array.astype(dtype))
  if fresh:
    logging.info('%s: initialising %s from seed %d (not in the checkpoint)', path,
                 ' and '.join(sorted(fresh)), seed)
    new = [p for t in table if t.group in fresh for p in t.ours]
    values.update(zip(new, _initialise(config, head, seed, new, shardings)))
  nnx.replace_by_pure_dict(abstract, _nested(values))
  return nnx.merge(graphdef, abstract), config


def _nested(values: dict[tuple, Any]) -> dict:
  """{('a', 'b'): x} as {'a': {'b': x}}."""
  state = {}
  for path, value in values.items():
    node = state
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return state


def _initialise(config: TransformerConfig, head: HeadConfig | None, seed: int,
                paths: list[tuple], shardings: dict | None) -> list[jax.Array]:
  """The initial values of some parameters, computed born sharded; XLA drops the random
  initialisation of every other parameter as dead code."""
  def init():
    params = dict(nnx.to_flat_state(nnx.state(build(config, head, nnx.Rngs(seed)))))
    return [params[p].get_value() for p in paths]
  out = None if shardings is None else [shardings[p].get_value() for p in paths]
  return jax.jit(init, out_shardings=out)()

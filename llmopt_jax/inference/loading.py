"""One loader for every model a user can point at: `load(path, mesh, rules)` -> `LoadedModel`.

A path holds a model in one of three forms, told apart by the files in it:
  * a Hugging Face directory (config.json, model.safetensors, tokenizer.json): a causal LM, a
    *ForSequenceClassification, or a base model with head.json + head.safetensors beside it
    (`hf.export_classifier`'s export of a head no transformers class has, e.g. mean pooling);
  * a finished run's workdir, known by its model card (model.json, `tasks/finished.py`; LoRA
    adapters merged on load); a distill workdir stands for its distilled student, student_kd;
  * a variant directory of the ptq or qat stage (quant.json + model.safetensors): integers
    and scales (or a float copy) of that run's source model, whose card gives architecture,
    class names and tokenizer. Integer kernels run through the same model classes.
A classifier also carries its fine-tune's way from texts to ids (`encoder`, `max_len`: the HF
tokenizer's specials, or a decoder's leading eos, cut to the trained length), so predictions
see exactly the inputs of the fine-tune's own evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file

from llmopt_jax import hf, sharding
from llmopt_jax.data import classification
from llmopt_jax.hf import checkpoint as hf_checkpoint, configs as hf_configs, load as hf_load
from llmopt_jax.hf.export import HEAD_CONFIG, HEAD_WEIGHTS
from llmopt_jax.models.config import TransformerConfig
from llmopt_jax.models.heads import HeadConfig
from llmopt_jax.quant import checkpoint as quant_checkpoint, kernels, scorer, storage
from llmopt_jax.tasks import finished, starting_point
from llmopt_jax.train import trained

EXPECTED = ('a Hugging Face model directory (config.json + model.safetensors), a finished '
            "run's workdir (model.json) or a ptq/qat variant directory (quant.json)")
# Stages whose workdir holds one model once its run has finished.
_TRAINING_STAGES = ('pretrain', 'finetune', 'finetune_lm')


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A model ready to run: architecture, parameters on the mesh, and how it reads text."""
  path: str
  kind: str                          # 'lm' | 'classifier'
  config: TransformerConfig
  head: HeadConfig | None
  labels: tuple[str, ...]            # a classifier's class names, by class id; () for an LM
  graphdef: nnx.GraphDef
  params: nnx.State                  # on the mesh: by logical axes, or replicated (quantized)
  tokenizer: Any                     # .encode(text) (no special ids), .decode, .pad_id, ...
  tokenizer_dir: str | None          # tokenizer files (a chat template may be among them)
  quantized: str | None              # the recipe's name ('int8', ...) of integer weights
  encoder: Callable[[int], classification.Encode] | None  # classifier: max_len -> encode
  max_len: int                       # classifier: the trained length; LM: its context


def load(path: str, mesh: Mesh, rules: sharding.Rules, *,
         dtype: str | None = None) -> LoadedModel:
  """The model at `path`, its parameters placed on (mesh, rules), cast to `dtype` if given.

  Every path that is not a model, and every workdir whose run has not finished, is a one-line
  error naming the path and what was expected there.
  """
  if not os.path.isdir(path):
    what = 'a file, not a directory' if os.path.exists(path) else 'no such directory'
    raise FileNotFoundError(f'{path}: {what}; expected {EXPECTED}')
  if _has(path, storage.QUANT_JSON):
    return _variant(path, mesh, rules, dtype)
  if _has(path, finished.CARD):
    return _finished(path, mesh, rules, dtype)
  stage = _stage(path)
  if stage == 'distill' and _has(os.path.join(path, 'student_kd'), finished.CARD):
    return _finished(os.path.join(path, 'student_kd'), mesh, rules, dtype)
  if stage is not None:
    raise ValueError(_no_model_in_workdir(path, stage))
  if _has(path, 'config.json'):
    return _huggingface(path, mesh, rules, dtype)
  raise ValueError(f'{path}: not a model; expected {EXPECTED}')


def _has(directory: str, name: str) -> bool:
  return os.path.isfile(os.path.join(directory, name))


def _stage(directory: str) -> str | None:
  """The stage of a llmopt_jax workdir (its config.json names one), else None."""
  file = os.path.join(directory, 'config.json')
  return hf_checkpoint.read_json(file).get('stage') if os.path.isfile(file) else None


def _no_model_in_workdir(path: str, stage: str) -> str:
  """Why a workdir without a model card is no model, and what to give instead."""
  if stage in _TRAINING_STAGES or stage == 'distill':
    card = f'student_kd/{finished.CARD}' if stage == 'distill' else finished.CARD
    return (f'{path}: its {stage} run has not finished (no {card} yet); rerun its command to '
            f'finish it, then load it')
  inside = sorted(os.path.relpath(os.path.dirname(p), path) for p in _model_files(path))
  return (f'{path} is a workdir of the {stage} stage, not one model; give one of the model '
          f'directories in it ({", ".join(inside) or "none written yet"})')


def _model_files(path: str) -> list[str]:
  """Model cards and variant manifests up to two levels below `path`."""
  return [file for depth in ('*', os.path.join('*', '*'))
          for name in (finished.CARD, storage.QUANT_JSON)
          for file in glob.glob(os.path.join(glob.escape(path), depth, name))]


# ---- A finished run -------------------------------------------------------------------------

def _finished(workdir: str, mesh: Mesh, rules: sharding.Rules, dtype: str | None) -> LoadedModel:
  model = finished.load(workdir, mesh, rules, dtype=dtype)
  return _from_card(workdir, model.card, model.graphdef, model.params, quantized=None)


def _from_card(workdir: str, card: finished.ModelCard, graphdef: nnx.GraphDef,
               params: nnx.State, quantized: str | None) -> LoadedModel:
  """A model described by its run's card; the tokenizer, encoder and length are the run's."""
  tokenizer_dir = card.tokenizer_dir
  if tokenizer_dir == '.':  # the run's own directory holds its tokenizer
    tokenizer_dir = workdir
  if card.tokenizer == 'huggingface':
    tokenizer, encoder = HFText(tokenizer_dir), functools.partial(starting_point.hf_encoder, tokenizer_dir)
  else:
    tokenizer = finished.lm_tokenizer(card, workdir)
    encoder = functools.partial(classification.token_encoder, tokenizer)
  data = trained.read_config(os.path.dirname(os.path.join(workdir, card.run_config))).get(
      'data', {})
  classifier = card.head is not None
  return LoadedModel(
      path=workdir, kind='classifier' if classifier else 'lm', config=card.model,
      head=card.head, labels=card.labels, graphdef=graphdef, params=params,
      tokenizer=tokenizer, tokenizer_dir=tokenizer_dir, quantized=quantized,
      encoder=encoder if classifier else None,
      max_len=_context(card.model, data, classifier))


def _context(config: TransformerConfig, data: Any, classifier: bool) -> int:
  """A classifier's trained max_len; an LM's position table, else its training seq_len; else
  (RoPE) the context of its pretraining."""
  positions, rope = config.max_positions, config.rope_original_max_positions
  return (data.get('max_len') or positions or rope) if classifier else (
      positions or data.get('seq_len') or rope)


# ---- A ptq/qat variant directory ------------------------------------------------------------

def _variant(path: str, mesh: Mesh, rules: sharding.Rules, dtype: str | None) -> LoadedModel:
  """Weights written by a quantization stage, on the float model of that run's source."""
  model_dir = _variant_source(path)
  card = finished.read_card(model_dir)
  like = nnx.state(nnx.eval_shape(lambda: card.build(nnx.Rngs(0))), nnx.Param)
  params, recipe, _ = quant_checkpoint.load(path, like)
  floats = {x.dtype.name for x in jax.tree.leaves(params, is_leaf=_is_kernel) if _is_float(x)}
  dtype = dtype or ('bfloat16' if floats == {'bfloat16'} else None)  # the bfloat16 variant
  if dtype is not None:
    params = jax.tree.map(lambda x: x.astype(dtype) if _is_float(x) else x, params,
                          is_leaf=_is_kernel)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: card.build(nnx.Rngs(0), dtype)))
  loaded = _from_card(model_dir, card, graphdef, _replicated(params, mesh),
                      None if recipe is None else recipe.name)
  return dataclasses.replace(loaded, path=path)


def _variant_source(path: str) -> str:
  """The float model a variant directory was made from: its run's source (or the source's
  student). ptq-<recipe>/ sits in the ptq workdir, qat-<recipe>/quantized/ a level deeper."""
  parent = os.path.dirname(os.path.abspath(path))
  run_dir = parent if _stage(parent) else os.path.dirname(parent)
  if _stage(run_dir) not in ('ptq', 'qat'):
    raise ValueError(f'{path}: weights outside a ptq or qat workdir, so nothing says which '
                     f'model (architecture, classes, tokenizer) they belong to')
  source = hf_checkpoint.read_json(os.path.join(run_dir, 'config.json')).get('source', {})
  source_dir = source.get('workdir') or os.path.join(run_dir, 'source')
  if not os.path.isdir(source_dir):
    raise FileNotFoundError(f'{path}: {source_dir}, the model it was quantized from '
                            f'(config.source.workdir of {run_dir}), is gone')
  return scorer.source_model_dir(source_dir, source.get('student', 'student_kd'))


def _is_kernel(x: Any) -> bool:
  return isinstance(x, kernels.QuantizedKernel)


def _is_float(x: Any) -> bool:  # a float array (a quantized kernel's scales are its own)
  return not _is_kernel(x) and jnp.issubdtype(x.dtype, jnp.floating)


def _replicated(tree: Any, mesh: Mesh) -> Any:
  """Host arrays as copies on every device of the mesh (each process supplies its own)."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda x: jax.make_array_from_callback(
      np.shape(x), replicated, lambda index: np.asarray(x)[index]), tree)


# ---- A Hugging Face directory ---------------------------------------------------------------

def _huggingface(path: str, mesh: Mesh, rules: sharding.Rules,
                 dtype: str | None) -> LoadedModel:
  hf_config = hf_load.read_config(path)
  try:
    _, kind = hf_configs.architecture(hf_config)
    head, labels = hf_configs.from_hf(hf_config)[1], _hf_labels(hf_config)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from None
  if kind == 'base':
    if not _has(path, HEAD_CONFIG):
      names = hf_config.get('architectures') or [hf_config.get('model_type')]
      raise ValueError(f'{path}: {names[0]} is a base model without a head, which predicts '
                       f'nothing; give a causal LM, a *ForSequenceClassification, a fine-tuned '
                       f'run, or a classifier export with {HEAD_CONFIG}')
    head, labels = _sidecar_head(path)
  overrides = {} if dtype is None else {'dtype': dtype, 'param_dtype': dtype}
  model, config = hf.load_pretrained(path, mesh=mesh, rules=rules, head=head, **overrides)
  graphdef, params = nnx.graphdef(model), nnx.state(model, nnx.Param)
  if kind == 'base':
    params = _with_sidecar_weights(path, params)
  classifier = head is not None
  return LoadedModel(
      path=path, kind='classifier' if classifier else 'lm', config=config, head=head,
      labels=labels if classifier else (), graphdef=graphdef, params=params,
      tokenizer=HFText(path), tokenizer_dir=path, quantized=None,
      encoder=functools.partial(starting_point.hf_encoder, path) if classifier else None,
      max_len=_context(config, {}, classifier))


def _hf_labels(hf_config: dict) -> tuple[str, ...]:
  """Class names by id from id2label (LABEL_<i> where a name is missing)."""
  names = hf_config.get('id2label') or {}
  count = len(names) or hf_config.get('num_labels', 2)
  return tuple(names.get(str(i), f'LABEL_{i}') for i in range(count))


def _sidecar_head(path: str) -> tuple[HeadConfig, tuple[str, ...]]:
  """(head, class names) of a base model exported with head.json beside it."""
  description = hf_checkpoint.read_json(os.path.join(path, HEAD_CONFIG))
  try:
    head = HeadConfig(int(description['num_labels']), description['pooling'])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f'{path}/{HEAD_CONFIG}: not a head description ({e})') from None
  return head, _hf_labels({**description, 'num_labels': head.num_labels})


def _with_sidecar_weights(path: str, params: nnx.State) -> nnx.State:
  """`params` with the classifier of head.safetensors (torch Linear layout: weight [L, D])."""
  weights = load_file(os.path.join(path, HEAD_WEIGHTS))
  for name, variable in params['classifier'].items():  # kernel [D, L] (and bias [L])
    value = weights[f'classifier.{"weight" if name == "kernel" else name}']
    value, target = (value.T if name == 'kernel' else value), variable.get_value()
    if value.shape != target.shape:
      raise ValueError(f'{path}/{HEAD_WEIGHTS}: classifier.{name} has shape '
                       f'{value.shape}, expected {target.shape}')
    variable.set_value(jax.device_put(value.astype(target.dtype), target.sharding))
  return params


class HFText:
  """A Hugging Face tokenizer.json as a text tokenizer (`data.tokenizers.Tokenizer`): ids of
  the text alone, specials left to the caller (a chat template or a prompt adds its own)."""

  def __init__(self, directory: str):
    self._padded = hf.load_tokenizer(directory, max_len=1)  # pad and eos ids, decode
    self._plain = tokenizers.Tokenizer.from_file(os.path.join(directory, 'tokenizer.json'))
    self._plain.no_truncation()
    self._plain.no_padding()
    self.pad_id, self.vocab_size = self._padded.pad_id, self._padded.vocab_size

  @property
  def eos_id(self) -> int:
    return self._padded.eos_id

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._plain.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self._padded.decode(ids)

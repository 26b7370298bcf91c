"""Our model back to a Hugging Face directory that `transformers` loads with the same outputs.

Writes `config.json` (the matching HF class: *ForCausalLM / GPT2LMHeadModel, *Model, or
*ForSequenceClassification when our head pools as HF's does), `model.safetensors` (sharded
with an index past `max_shard_bytes`) in the parameter dtype, and copies the tokenizer files.
A classifier that pools as no HF class does (MiniLM's mean pooling) goes out as the base
model plus `head.safetensors` and `head.json` beside it (`export_classifier`).
Tensor names are those `save_pretrained` writes: a base model's bare, a task class's under the
base model's prefix (`model.`, `transformer.`, `bert.`). Parameters are gathered to the host
one at a time (across processes when sharded over several); process 0 writes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import safetensors.numpy
from flax import nnx
from jax.experimental import multihost_utils

from llmopt_jax import distributed
from llmopt_jax.hf import checkpoint, configs, layouts, tokenizer as tokenizer_lib
from llmopt_jax.models.config import TransformerConfig
from llmopt_jax.models.heads import HeadConfig


def _flat_params(model_or_state: Any) -> dict[tuple, Any]:
  """path -> array of a model, an nnx.State, or a nested dict of arrays."""
  if isinstance(model_or_state, nnx.Module):
    model_or_state = nnx.state(model_or_state, nnx.Param)
  if isinstance(model_or_state, nnx.State):
    model_or_state = nnx.to_pure_dict(model_or_state)
  flat = {}

  def visit(node: Any, path: tuple) -> None:
    if isinstance(node, Mapping):
      for key, child in node.items():
        visit(child, path + (key,))
    else:
      flat[path] = node.get_value() if isinstance(node, nnx.Variable) else node
  visit(model_or_state, ())
  return flat


def _to_host(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def export(model_or_state: Any, config: TransformerConfig, out_dir: str, *,
           tokenizer_dir: str | None = None, head: HeadConfig | None = None,
           pad_token_id: int | None = None, labels: Sequence[str] | None = None,
           max_shard_bytes: int = 4 << 30) -> str:
  """Writes `model_or_state` as an HF model directory `out_dir` (new or empty); returns it.

  Args:
    model_or_state: a `Transformer` or `SequenceClassifier`, or its Param state (an
      nnx.State or nested dict, as `nnx.to_pure_dict` gives; LoRA adapters merged first).
    config: the model's (backbone) config.
    tokenizer_dir: a directory whose tokenizer files are copied along.
    head: the classification head of a state (a `SequenceClassifier` knows its own).
    pad_token_id: for config.json; HF's decoder classifiers find the last token through it.
      Default: the tokenizer's padding id when `tokenizer_dir` is given.
    labels: class names for id2label (default LABEL_0, LABEL_1, ...).
  """
  head = head or getattr(model_or_state, 'head', None)
  if head is not None:
    config = config.replace(lm_head=False)
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f'{out_dir}: not empty; export writes into a new directory')
  distributed.barrier('hf_export')  # every process has checked before process 0 writes
  if pad_token_id is None and tokenizer_dir is not None:
    pad_token_id = tokenizer_lib.load_tokenizer(tokenizer_dir, 1).pad_id
  hf_config = configs.to_hf(config, head, pad_token_id=pad_token_id, labels=labels)
  params = _flat_params(model_or_state)
  table = [t for t in layouts.tensors(config, head) if all(p in params for p in t.ours)]
  covered = {p for t in table for p in t.ours}
  unknown = sorted(set(params) - covered, key=str)
  if unknown:
    raise ValueError(f'parameter {"/".join(map(str, unknown[0]))} has no Hugging Face '
                     f'counterpart (merge LoRA adapters, or pass the matching head)')
  # save_pretrained of a base model writes bare names; of a task class, the prefixed ones.
  prefix = '' if head is None and not config.lm_head else layouts.PREFIX[config.family] + '.'
  dtype = np.dtype(jax.numpy.dtype(config.param_dtype))

  def tensors() -> Iterator[tuple[str, np.ndarray]]:
    for t in table:
      array = layouts.to_hf(t, [_to_host(params[p]) for p in t.ours]).astype(dtype)
      yield (prefix + t.hf if t.in_base else t.hf), array

  if jax.process_index() != 0:
    for _ in tensors():  # the gathers are collectives: every process takes part
      pass
    return out_dir
  os.makedirs(out_dir, exist_ok=True)
  checkpoint.write(tensors(), out_dir, max_shard_bytes=max_shard_bytes)
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(hf_config, f, indent=2)
  if tokenizer_dir is not None:
    for name in tokenizer_lib.TOKENIZER_FILES:
      if os.path.exists(os.path.join(tokenizer_dir, name)):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
  return out_dir


# Beside a base model: the head of a classifier that pools as no transformers class does.
HEAD_WEIGHTS, HEAD_CONFIG = 'head.safetensors', 'head.json'
_RECIPE = {
    'mean': 'the mean of last_hidden_state over real tokens (attention_mask 1)',
    'cls': 'last_hidden_state of the first token',
    'last': 'last_hidden_state of the last real token (right padding)',
}


def export_classifier(model_or_state: Any, config: TransformerConfig, head: HeadConfig,
                      out_dir: str, *, labels: Sequence[str] | None = None,
                      tokenizer_dir: str | None = None, pad_token_id: int | None = None) -> str:
  """A sequence classifier as a directory transformers loads; returns `out_dir`.

  Where a transformers class pools as `head` does (BERT 'cls' through its pooler, decoders
  'last'), that *ForSequenceClassification, with id2label from `labels`. Otherwise the
  backbone goes out as the HF base model (BertModel, LlamaModel, GPT2Model) and the head
  beside it, in the sentence-transformers manner of a base model plus pooling plus a layer:
    head.safetensors  `classifier.weight` [num_labels, hidden] (torch.nn.Linear layout) and,
                      for BERT, `classifier.bias` [num_labels]; float32
    head.json         pooling, labels, and the recipe: logits = pooled @ weight.T + bias, with
                      pooled taken from AutoModel's last_hidden_state as `head.pooling` says.
  Arguments are those of `export`; the state is a `SequenceClassifier`'s (LoRA merged).
  """
  if configs.HF_POOLING[config.family] == head.pooling:
    return export(model_or_state, config, out_dir, tokenizer_dir=tokenizer_dir, head=head,
                  pad_token_id=pad_token_id, labels=labels)
  params = model_or_state
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  if 'pooler' in params:  # only BERT's 'cls' pooling has one, and that has an HF class
    raise ValueError(f'cannot export a pooler with {head.pooling!r} pooling')
  names = list(labels) if labels is not None else [f'LABEL_{i}' for i in range(head.num_labels)]
  if len(names) != head.num_labels:
    raise ValueError(f'{len(names)} label names for {head.num_labels} labels')
  classifier = _flat_params(params['classifier'])
  weights = {f'classifier.{"weight" if p == ("kernel",) else "bias"}':
             _to_host(v).astype(np.float32) for p, v in classifier.items()}
  weights['classifier.weight'] = np.ascontiguousarray(weights['classifier.weight'].T)
  export(params['backbone'], config.replace(lm_head=False), out_dir,
         tokenizer_dir=tokenizer_dir, pad_token_id=pad_token_id)
  if jax.process_index() != 0:
    return out_dir
  safetensors.numpy.save_file(weights, os.path.join(out_dir, HEAD_WEIGHTS),
                              metadata={'format': 'pt'})
  description = {
      'pooling': head.pooling,
      'num_labels': head.num_labels,
      'id2label': {str(i): n for i, n in enumerate(names)},
      'weights': HEAD_WEIGHTS,
      'recipe': f'hidden = AutoModel.from_pretrained(<this directory>)(input_ids, '
                f'attention_mask).last_hidden_state; pooled = {_RECIPE[head.pooling]}; '
                f'logits = pooled @ classifier.weight.T (+ classifier.bias)',
  }
  with open(os.path.join(out_dir, HEAD_CONFIG), 'w', encoding='utf-8') as f:
    json.dump(description, f, indent=2)
  return out_dir

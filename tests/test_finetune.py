"""The fine-tune stage end to end: all-MiniLM-L6-v2 on Banking77, fully and with LoRA, and
the Hugging Face export that ends it, against transformers itself."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import tolerances
from conftest import load_config, load_finished, restore_state
from llmopt_jax import hf
from llmopt_jax.stages import finetune


def test_tiny_banking77_finetune_beats_the_majority_class(tmp_path):
  """30 steps already put test accuracy far above always answering the commonest intent."""
  config = load_config('finetune', 'tiny')
  summary = finetune.run(config, str(tmp_path))
  report = summary['test']
  majority = max(report['support'].values()) / report['num_examples']
  assert report['num_examples'] == 8 * config.train.batch_size
  assert report['accuracy'] > max(5 * majority, 0.15), (report['accuracy'], majority)
  assert 0.0 < report['macro_f1'] <= 1.0
  assert report['trainable_params'] == report['total_params']
  assert (tmp_path / 'report.md').exists() and (tmp_path / 'report.json').exists()


def _flat(tree) -> dict[str, np.ndarray]:
  """'/'-joined parameter paths -> arrays, whether list indices are ints or strings and
  whether a checkpoint kept the variables' `value` field in the path."""
  def name(key):
    return str(getattr(key, 'key', getattr(key, 'idx', getattr(key, 'name', key))))
  flat = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    flat['/'.join(name(k) for k in path).removesuffix('/value')] = np.asarray(leaf)
  return flat


def test_lora_finetune_trains_adapters_and_head_only_and_exports_merged(tmp_path):
  """Under LoRA the pretrained weights stay bitwise what the checkpoint file holds; the export
  (adapters merged) follows the documented recipe to our logits."""
  config = load_config('finetune', 'tiny,peft=lora')
  config.train.update(num_steps=4, eval_every=4)
  config.checkpoint.every_steps = 4
  summary = finetune.run(config, str(tmp_path))
  assert summary['test']['trainable_params'] < 0.1 * summary['test']['total_params']

  state = restore_state(tmp_path, 4)
  model, _ = hf.load_pretrained(hf.minilm_path())
  pretrained = _flat(nnx.to_pure_dict(nnx.state(model)))
  trained = _flat(state['params']['base']['backbone'])
  shared = set(pretrained) & set(trained)
  assert len(shared) > 50  # every backbone tensor of the 6-layer encoder
  for path in shared:
    np.testing.assert_array_equal(trained[path], pretrained[path], err_msg=str(path))  # frozen
  adapters = jax.tree.leaves(state['params']['lora'])
  assert adapters and any(np.abs(a).max() > 0 for a in adapters)

  _check_mean_pooling_export(config, str(tmp_path))


def _check_mean_pooling_export(config, workdir: str) -> None:
  """Mean pooling has no transformers class: the export is BertModel plus head.safetensors,
  and mean-pooling its last_hidden_state over real tokens, then the linear classifier, must
  give our logits (the best checkpoint's, LoRA merged) within float32 rounding (relative to the
  largest logit: eps32 times the terms summed along the path and the pooling, see
  tests/tolerances.py)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  export = os.path.join(workdir, 'export')
  assert {'config.json', 'model.safetensors', 'head.safetensors', 'head.json',
          'tokenizer.json'} <= set(os.listdir(export))
  with open(os.path.join(export, 'head.json'), encoding='utf-8') as f:
    head = json.load(f)
  assert head['pooling'] == 'mean' and head['num_labels'] == 77
  assert head['id2label']['0'] == 'card_arrival'

  queries = ['How do I reset my card PIN?', 'hi',
             'My transfer from abroad has still not arrived after five days']
  batch = hf.load_tokenizer(export, max_len=config.data.max_len)(queries)  # exported files
  model = transformers.AutoModel.from_pretrained(export, dtype=torch.float32).eval()
  assert type(model).__name__ == 'BertModel'
  with torch.no_grad():
    hidden = model(**{name: torch.tensor(batch[key], dtype=torch.long) for name, key in (
        ('input_ids', 'tokens'), ('attention_mask', 'padding_mask'),
        ('token_type_ids', 'token_types'))}).last_hidden_state.numpy()
  mask = batch['padding_mask'][..., None].astype(np.float32)
  pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
  weights = load_file(os.path.join(export, 'head.safetensors'))
  assert {w.dtype for w in weights.values()} == {np.dtype(np.float32)}
  theirs = pooled @ weights['classifier.weight'].T + weights['classifier.bias']

  graphdef, params = load_finished(workdir)
  classifier = nnx.merge(graphdef, params)
  ours = np.asarray(classifier(**{k: jnp.asarray(v) for k, v in batch.items()}))
  length = batch['tokens'].shape[1]
  terms = tolerances.forward_terms(classifier.config, length) + length
  assert np.abs(ours - theirs).max() / np.abs(theirs).max() < tolerances.sum_tolerance(terms, 1.0)

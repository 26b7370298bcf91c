"""The Hugging Face export that ends a classification fine-tune, against transformers itself.

A decoder fine-tuned from a pretrain workdir with 'last' pooling exports as
LlamaForSequenceClassification with our logits. (The mean-pooling MiniLM export, base model
plus head.safetensors, is checked in test_finetune.py on the LoRA run it already makes: a
second MiniLM fine-tune would double the slowest part of the suite.)
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tolerances
from conftest import load_config, load_finished
from llmopt_jax.data import classification
from llmopt_jax.stages import finetune

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

QUERIES = ['How do I reset my card PIN?', 'hi',
           'My transfer from abroad has still not arrived after five days']


def _our_logits(config, workdir: str, batch: dict[str, np.ndarray]):
  """Our classifier's logits from the best checkpoint, rebuilt as a later stage would, and
  its model config."""
  graphdef, params = load_finished(workdir)
  model = nnx.merge(graphdef, params)
  types = batch['token_types'] if model.config.type_vocab_size else None
  return np.asarray(model(jnp.asarray(batch['tokens']), padding_mask=jnp.asarray(
      batch['padding_mask']), token_types=None if types is None else jnp.asarray(types))
                    ), model.config


def _rel_err(ours: np.ndarray, theirs: np.ndarray) -> float:
  """max |ours - theirs| / max |theirs|: two float32 implementations of one forward pass
  differ by eps32 times the terms summed along its path, relative to the largest output
  (tests/tolerances.py)."""
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def test_decoder_from_pretrain_workdir_fine_tunes_and_exports_as_hf_classifier(
    pretrain_workdir, tmp_path):
  """Classification from our own pretrain run: a new head on its decoder, its byte tokenizer;
  with 'last' pooling the export is LlamaForSequenceClassification, logits and all.

  At tiny size the 6-step-pretrained byte model barely separates 77 intents in 30 steps, so
  this checks that it runs, reports and learns (validation loss falls), not its accuracy.
  """
  config = load_config('finetune', f'tiny,model={pretrain_workdir}')
  config.head.pooling = 'last'
  workdir = str(tmp_path / 'ft')
  summary = finetune.run(config, workdir)
  report = summary['test']
  assert report['num_examples'] == 8 * config.train.batch_size
  assert report['trainable_params'] == report['total_params']
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    losses = [r['eval/loss'] for r in map(json.loads, f) if 'eval/loss' in r]
  assert len(losses) == 2 and losses[1] < losses[0] < np.log(77) + 0.1, losses

  export = os.path.join(workdir, 'export')
  assert not os.path.exists(os.path.join(export, 'tokenizer.json'))  # bytes: nothing to ship
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      export, dtype=torch.float32).eval()
  assert type(model).__name__ == 'LlamaForSequenceClassification'
  assert model.config.id2label[0] == 'card_arrival'
  tokens, mask, types = classification.byte_encoder(config.data.max_len)(QUERIES)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  batch = dict(tokens=tokens, padding_mask=mask, token_types=types)
  ours, model_config = _our_logits(config, workdir, batch)
  terms = tolerances.forward_terms(model_config, tokens.shape[1])
  assert _rel_err(ours, theirs) < tolerances.sum_tolerance(terms, 1.0)

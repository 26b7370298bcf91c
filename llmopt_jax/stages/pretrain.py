"""Stage `pretrain`: a decoder-only LM trained with next-token prediction on a text corpus.

Chain: corpus (a TFDS text set; shipped: tiny Shakespeare) -> tokenizer (bytes, or BPE
trained on the train split and kept in the workdir) -> packed sequences -> the shared loop.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from llmopt_jax import distributed, losses, optim, workdir as workdir_lib
from llmopt_jax.data import lm_pipeline, sources, tokenizers
from llmopt_jax.models import stats
from llmopt_jax.models.config import TransformerConfig
from llmopt_jax.models.transformer import Transformer
from llmopt_jax.train import loop

# Embedding tables are padded to a multiple of this, so the vocabulary axis splits evenly
# over tensor-parallel meshes and matmuls keep friendly shapes.
VOCAB_MULTIPLE = 128


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  workdir_lib.prepare(workdir, config)
  optim.make_optimizer(config.optim, config.train.num_steps)  # a bad field fails before data work
  task, model_config = build_task(config, workdir)
  _describe(model_config, config)
  return loop.train(config, workdir, task)


def build_task(config: ml_collections.ConfigDict, workdir: str) -> tuple[loop.Task, Any]:
  """Data, tokenizer and model for next-token prediction, as the loop's `Task`."""
  data = config.data
  train_source, eval_source = text_sources(data)
  tokenizer = tokenizers.get_tokenizer(
      data.tokenizer, vocab_size=data.vocab_size, path=os.path.join(workdir, 'tokenizer.json'),
      train_texts=lambda: lm_pipeline.iter_texts(train_source))

  model_config = TransformerConfig.from_dict({
      **config.model.to_dict(), 'vocab_size': _round_up(tokenizer.vocab_size, VOCAB_MULTIPLE)})
  task = lm_task(config, train_source, eval_source, tokenizer,
                 lambda rngs: Transformer(model_config, rngs=rngs))
  return task, model_config


def text_sources(
    data: ml_collections.ConfigDict) -> tuple[sources.TextSource, sources.TextSource]:
  """The (train, eval) documents `config.data` names; the LM fine-tune reads them too."""
  load = functools.partial(
      sources.load_text_source, data.name, data_dir=data.tfds_data_dir or None,
      text_field=data.text_field, path=data.path)
  return load(data.train_split), load(data.eval_split)


def lm_task(config: ml_collections.ConfigDict, train_source: sources.TextSource,
            eval_source: sources.TextSource, tokenizer: tokenizers.Tokenizer,
            build_model: Callable[[nnx.Rngs], nnx.Module]) -> loop.Task:
  """Next-token prediction on packed sequences of `tokenizer`'s ids, for any causal model:
  pretraining builds a fresh one, the LM fine-tune adds its starting weights to this Task."""
  train_data = lm_pipeline.ShardedBatches([
      lm_pipeline.LMBatches(
          train_source, tokenizer, seq_len=config.data.seq_len, batch_size=rows,
          seed=config.seed, shard_index=shard, shard_count=count)
      for shard, rows, count in distributed.data_shards(config)])
  eval_data = _eval_batches(config, eval_source, tokenizer)
  return loop.Task(
      build_model=build_model,
      loss_fn=losses.lm_loss,
      eval_fn=losses.lm_eval,
      train_data=train_data,
      eval_data=lambda: eval_data,
  )


def _eval_batches(config: ml_collections.ConfigDict, source, tokenizer) -> list[dict]:
  """This process's validation batches, padded so every process runs as many eval steps."""
  rows = config.train.batch_size // jax.process_count()
  batches = lm_pipeline.eval_batches(
      source, tokenizer, seq_len=config.data.seq_len, batch_size=rows,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      max_batches=config.train.eval_batches or None)
  count = distributed.max_over_processes(len(batches))
  template = {k: np.zeros((rows, config.data.seq_len), v)
              for k, v in (('inputs', np.int32), ('targets', np.int32), ('weights', np.float32))}
  return lm_pipeline.pad_batches(batches, count, template)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _describe(model: TransformerConfig, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() != 0:
    return
  params = stats.count_params(model)
  flops = stats.flops_per_token(model, config.data.seq_len)
  tokens = config.train.batch_size * config.data.seq_len
  print(f'Model: {params / 1e6:.2f}M parameters, vocab {model.vocab_size}, '
        f'{flops / 1e6:.1f} MFLOPs per training token; {tokens} tokens per step, '
        f'{config.train.num_steps} steps.', flush=True)

"""Next-token prediction on a text corpus: the pretrain task and the causal-LM fine-tune task.

Chain: documents (a TFDS text set; shipped: tiny Shakespeare; or a user's .txt) -> a tokenizer
(bytes, or BPE trained on the train split and kept in the workdir; or the starting model's own)
-> packed sequences, sharded per process -> a `Task` whose loss is the mean next-token cross
entropy and whose eval batches are padded so every process runs as many eval steps.
Optionally each epoch also reads `config.data.augment_copies` edited copies of every training
document (`data/augment/`, e.g. EDA's word swaps and deletions); validation never is.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from llmopt_jax import distributed, lora, losses, report
from llmopt_jax.data import lm_pipeline, sources, tokenizers
from llmopt_jax.data.augment import pipeline as augment_pipeline
from llmopt_jax.data.augment.config import AugmentConfig
from llmopt_jax.models.config import TransformerConfig
from llmopt_jax.models.transformer import Transformer
from llmopt_jax.tasks import peft
from llmopt_jax.tasks.finished import ModelCard
from llmopt_jax.tasks.starting_point import StartingPoint
from llmopt_jax.train.task import Task

# Embedding tables are padded to a multiple of this, so the vocabulary axis splits evenly
# over tensor-parallel meshes and matmuls keep friendly shapes.
VOCAB_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class LanguageModelTask:
  """A next-token `Task` and what a report, an export or a later stage needs of it."""
  task: Task
  card: ModelCard               # the model, its tokenizer, its adapters
  counts: peft.ParamCounts | None = None  # a fine-tune's trainable / total parameters
  start: StartingPoint | None = None      # a fine-tune's starting point


def pretraining(config: ml_collections.ConfigDict, workdir: str) -> LanguageModelTask:
  """A fresh decoder (`config.model`) on `config.data`, its tokenizer kept in `workdir`."""
  data = config.data
  augment = training_data_options(config)  # a bad field fails before the tokenizer trains
  train_source, eval_source = text_sources(data)
  tokenizer_path = os.path.join(workdir, 'tokenizer.json')
  tokenizer = tokenizers.get_tokenizer(
      data.tokenizer, vocab_size=data.vocab_size, path=tokenizer_path,
      train_texts=lambda: lm_pipeline.iter_texts(train_source))
  model = TransformerConfig.from_dict({
      **config.model.to_dict(), 'vocab_size': _round_up(tokenizer.vocab_size, VOCAB_MULTIPLE)})
  # Bytes and the BPE trained here have no mask token: `mask` writes a placeholder.
  task = next_token_task(config, train_source, eval_source, tokenizer,
                         lambda rngs: Transformer(model, rngs=rngs), augment=augment)
  card = ModelCard(stage=config.stage, model=model, tokenizer=data.tokenizer,
                   tokenizer_dir='.' if data.tokenizer == 'bpe' else None,
                   pad_id=tokenizer.pad_id)
  return LanguageModelTask(task, card)


def fine_tuning(config: ml_collections.ConfigDict, start: StartingPoint,
                lora_cfg: lora.LoraConfig | None) -> LanguageModelTask:
  """The causal LM of `start` on `config.data`, read through its own tokenizer; full, frozen
  (`optim.freeze`) or LoRA."""
  model, data = start.model, config.data
  augment = training_data_options(config)
  if model.max_positions and data.seq_len > model.max_positions:
    raise ValueError(f'config.data.seq_len={data.seq_len} exceeds the {model.max_positions} '
                     f'positions of {config.init.model}')
  tokenizer = start.lm_tokenizer()
  if tokenizer.vocab_size > model.vocab_size:
    raise ValueError(f'config.init.model={start.path}: its tokenizer has {tokenizer.vocab_size} '
                     f'ids but the model only {model.vocab_size}')
  train_source, eval_source = text_sources(data)
  task = next_token_task(config, train_source, eval_source, tokenizer,
                         lambda rngs: Transformer(model, rngs=rngs), augment=augment,
                         tokenizer_dir=start.tokenizer_dir)
  task = dataclasses.replace(task, pretrained=start.pretrained(None),
                             **peft.lora_fields(lora_cfg, config.seed))
  card = start.card(config.stage, head=None, lora_cfg=lora_cfg)
  return LanguageModelTask(task, card, peft.count_params(task, config.optim.freeze), start)


def text_sources(
    data: ml_collections.ConfigDict) -> tuple[sources.TextSource, sources.TextSource]:
  """The (train, eval) documents `config.data` names."""
  load = functools.partial(
      sources.load_text_source, data.name, data_dir=data.tfds_data_dir or None,
      text_field=data.text_field, path=data.path)
  return load(data.train_split), load(data.eval_split)


def training_data_options(config: ml_collections.ConfigDict) -> AugmentConfig:
  """`config.data`'s augmentation, checked (fields absent, as in an older run's config: off);
  a stage may call this before it writes anything, so a bad field is a one-line error."""
  return AugmentConfig.from_config(config.data)


def next_token_task(config: ml_collections.ConfigDict, train_source: sources.TextSource,
                    eval_source: sources.TextSource, tokenizer: tokenizers.Tokenizer,
                    build_model: Callable[[nnx.Rngs], nnx.Module], *,
                    augment: AugmentConfig | None = None,
                    tokenizer_dir: str | None = None) -> Task:
  """Next-token prediction on packed sequences of `tokenizer`'s ids, for any causal model.

  `augment` (default: read from `config.data`) edits copies of the training documents;
  `tokenizer_dir`, a Hugging Face tokenizer's directory, supplies the token `mask` writes.
  """
  if augment is None:
    augment = training_data_options(config)
  augmenter = _augmenter(config, augment, tokenizer, tokenizer_dir, len(train_source))
  train_data = lm_pipeline.ShardedBatches([
      lm_pipeline.LMBatches(
          train_source, tokenizer, seq_len=config.data.seq_len, batch_size=rows,
          seed=config.seed, shard_index=shard, shard_count=count, augment=augmenter)
      for shard, rows, count in distributed.data_shards(config)])
  eval_data = _eval_batches(config, eval_source, tokenizer)
  return Task(
      build_model=build_model,
      loss_fn=losses.lm_loss,
      eval_fn=losses.lm_eval,
      train_data=train_data,
      eval_data=lambda: eval_data,
  )


def _augmenter(config: ml_collections.ConfigDict, augment: AugmentConfig,
               tokenizer: tokenizers.Tokenizer, tokenizer_dir: str | None,
               documents: int) -> augment_pipeline.Augmenter | None:
  """The training documents' augmenter (None when off), announced once."""
  if not augment.enabled:
    return None
  mask = _mask_token(augment.mask, tokenizer, tokenizer_dir)
  report.say(f'Augmentation: {augment.describe()}; an epoch reads '
             f'{documents * (1 + augment.copies)} training documents')
  return dataclasses.replace(augment, mask=mask).build(config.seed, tokenizer_dir)


def _mask_token(configured: str, tokenizer: tokenizers.Tokenizer,
                tokenizer_dir: str | None) -> str:
  """What `mask` writes: the configured word, else the tokenizer's mask or unknown token, but
  never the end-of-text token. GPT-2 declares its end-of-text as its unknown token; written
  into a document it would end the document there, so the placeholder takes its place."""
  mask = configured or augment_pipeline.tokenizer_mask(tokenizer_dir)
  if tokenizer.eos_id not in tokenizer.encode(mask):
    return mask
  if configured:
    raise ValueError(f'config.data.augment_mask={configured!r} encodes to the end-of-text '
                     f"id, which would end a document; choose a plain word, or '' for the "
                     f'default')
  return augment_pipeline.PLACEHOLDER


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

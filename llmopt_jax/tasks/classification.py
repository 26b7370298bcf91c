"""Sequence classification on labelled texts: a pretrained backbone and a new head.

Chain: labelled texts (Banking77, CLINC150 or a user's CSV/TSV/JSONL) -> the starting point's
own tokenizer -> its pretrained backbone (a Hugging Face model, or a pretrain workdir's
decoder) + a pooling/classification head -> a `Task` (cross entropy with optional label
smoothing; accuracy, confusion counts) with balanced or shuffled training batches, sharded per
process, and fixed validation and test batches. Optionally the training split is cut to K
examples per class (`data/few_shot.py`) and its batches carry augmented copies of each
example (`data/augment/`); validation and test are never touched by either.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np

from llmopt_jax import classification_metrics, distributed, lora, report
from llmopt_jax.data import classification, intents, labelled, lm_pipeline
from llmopt_jax.data.augment.config import AugmentConfig
from llmopt_jax.data.few_shot import FewShotConfig
from llmopt_jax.hf.load import build
from llmopt_jax.models.heads import HeadConfig
from llmopt_jax.tasks import peft, starting_point
from llmopt_jax.tasks.finished import ModelCard
from llmopt_jax.tasks.starting_point import StartingPoint
from llmopt_jax.train.task import Task


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
  """The loop's `Task` and what a report, an export or a later stage needs of it."""
  task: Task
  splits: labelled.LabelledSplits
  test: list[dict[str, np.ndarray]]    # this process's test batches
  encode: classification.Encode        # texts -> padded id batches
  start: StartingPoint
  head: HeadConfig
  counts: peft.ParamCounts
  card: ModelCard
  # With config.data.shots_per_class: the training examples outside the K-shot subset, as
  # unlabelled text (their labels are kept for analysis only); None otherwise.
  unlabelled: labelled.Split | None = None

  @property
  def sizes(self) -> dict[str, int]:
    return {name: len(split) for name, split in self.splits.splits.items()}


def training_data_options(config: ml_collections.ConfigDict
                          ) -> tuple[FewShotConfig, AugmentConfig]:
  """The few-shot and augmentation settings of `config.data`, checked: a stage calls this
  before it writes anything, so a bad field is a one-line error and an untouched workdir."""
  return (FewShotConfig.from_config(config.data, config.seed),
          AugmentConfig.from_config(config.data))


def fine_tuning(config: ml_collections.ConfigDict,
                lora_cfg: lora.LoraConfig | None) -> ClassificationTask:
  """`config.init.model` with a new head on `config.data`, full, frozen or LoRA."""
  data = config.data
  shots, augment = training_data_options(config)
  splits = intents.load(
      data.name, path=data.path, text_field=data.text_field, label_field=data.label_field,
      validation_path=data.validation_path, test_path=data.test_path,
      validation_fraction=data.validation_fraction)
  if 'test' not in splits.splits:
    raise ValueError(f'config.data: {data.name} has no test split; set config.data.test_path')
  splits, cut = shots.apply(splits)
  if cut and cut.short:
    report.say(shots.describe_short(cut, splits.label_names))
  start = starting_point.resolve(config)
  augmenter = augment.build(config.seed, start.tokenizer_dir)
  if augmenter is not None:
    report.say(f'Augmentation: {augment.describe()}')
  backbone = start.model.replace(lm_head=False)
  head = HeadConfig(splits.num_classes, config.head.pooling)
  encode = start.encoder(data.max_len)

  processes, me = jax.process_count(), jax.process_index()
  per_process = config.train.batch_size // processes
  eval_split = lambda split, limit: classification.eval_batches(
      _subset_order(splits[split], limit), encode, batch_size=per_process, shard_index=me,
      shard_count=processes, max_batches=limit or None)
  train_data = lm_pipeline.ShardedBatches([
      classification.ClassificationBatches(
          splits['train'], encode, batch_size=rows, seed=config.seed, shard_index=shard,
          shard_count=count, balanced=data.balanced, augment=augmenter)
      for shard, rows, count in distributed.data_shards(config)])
  validation = eval_split('validation', config.train.eval_batches)
  task = Task(
      build_model=lambda rngs: build(backbone, head, rngs),
      loss_fn=_loss_fn(config.head.label_smoothing),
      eval_fn=eval_fn,
      train_data=train_data,
      eval_data=lambda: validation,
      count_tokens=lambda batch: batch['tokens'].size,
      pretrained=start.pretrained(head),
      **peft.lora_fields(lora_cfg, config.seed),
  )
  return ClassificationTask(
      task=task, splits=splits, test=eval_split('test', config.test_batches), encode=encode,
      start=start, head=head, counts=peft.count_params(task, config.optim.freeze),
      card=start.card(config.stage, head, lora_cfg, tuple(splits.label_names)),
      unlabelled=cut.unlabelled if cut else None)


def _loss_fn(label_smoothing: float):
  def loss_fn(model, batch, rngs, context=None):
    del context
    sums = classification_metrics.classification_sums(
        classifier_logits(model, batch, rngs), batch['labels'], batch['weights'],
        label_smoothing=label_smoothing, confusion=False)
    return sums['loss'][0], sums['loss'][1], sums
  return loss_fn


def eval_fn(model, batch):
  """Loss, accuracy and confusion counts of a classifier on one batch."""
  return classification_metrics.classification_sums(
      classifier_logits(model, batch), batch['labels'], batch['weights'])


def _subset_order(split, limit: int):
  """The split itself, or, when only `limit` batches are scored, the split in a fixed random
  order, so the scored subset covers the classes (the files are sorted by class)."""
  if not limit:
    return split
  order = np.random.default_rng(0).permutation(len(split))
  return labelled.Split(tuple(split.texts[i] for i in order), split.labels[order])


def classifier_logits(model, batch, rngs=None, intermediates: bool = False):
  """A `SequenceClassifier`'s logits [B, C] for a classification batch (and, with
  `intermediates`, its backbone's `Intermediates`); dropout only when `rngs` is given."""
  # Only BERT has token-type embeddings; the batches always carry the (zero) types.
  types = batch['token_types'] if model.config.type_vocab_size else None
  return model(batch['tokens'], token_types=types, padding_mask=batch['padding_mask'],
               rngs=rngs, intermediates=intermediates)

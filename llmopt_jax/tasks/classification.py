"""Sequence classification on labelled texts: a pretrained backbone and a new head.

Chain: labelled texts (Banking77, CLINC150 or a user's CSV/TSV/JSONL) -> the starting point's
own tokenizer -> its pretrained backbone (a Hugging Face model, or a pretrain workdir's
decoder) + a pooling/classification head -> a `Task` (cross entropy with optional label
smoothing; accuracy, confusion counts) with balanced or shuffled training batches, sharded per
process, and fixed validation and test batches. Optionally the training split is cut to K
examples per class (`data/few_shot.py`) and its batches carry augmented copies of each
example (`data/augment/`; a paraphrase or back-translation operation's rewrites are generated
once per run into <workdir>/augment/, `data/augment/rewrites.py`); validation and test are
never touched by either. Training batches may also carry unlabelled text
(`data/unlabelled.py`): for consistency training (`config.consistency`,
`consistency_training.py`), whose term then joins the loss, or for a distillation's transfer
set (`config.distill.transfer`, `distill/transfer.py`), which the distillation objective
reads; one of the two at most.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import numpy as np

from llmopt_jax import classification_metrics, distributed, lora, report
from llmopt_jax.data import classification, intents, labelled, lm_pipeline, unlabelled
from llmopt_jax.data.augment import rewrites as rewrites_lib
from llmopt_jax.data.augment.config import AugmentConfig
from llmopt_jax.data.augment.pipeline import Augmenter, Rewrites
from llmopt_jax.data.few_shot import FewShotConfig
from llmopt_jax.data.unlabelled import UnlabelledConfig
from llmopt_jax.distill import transfer
from llmopt_jax.hf.load import build
from llmopt_jax.models.heads import HeadConfig
from llmopt_jax.tasks import consistency_training, peft, starting_point
from llmopt_jax.tasks.consistency_training import ConsistencyConfig
from llmopt_jax.tasks.finished import ModelCard
from llmopt_jax.tasks.starting_point import StartingPoint
from llmopt_jax.train.task import Task


# Added to config.seed for the unlabelled text's augmenter (any constant would do).
_UNLABELLED_SEED = 0x55444141  # 'UDAA'


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


def unlabelled_options(config: ml_collections.ConfigDict
                       ) -> tuple[UnlabelledConfig | None, ConsistencyConfig | None]:
  """(the unlabelled rows training batches carry, consistency training's settings), each
  None when off, checked like `training_data_options`. The rows serve consistency training
  or a distillation's transfer set, not both: each would want its own share of the text."""
  uda = ConsistencyConfig.from_config(config)
  transfer_rows = transfer.transfer_stream(config)
  if uda and transfer_rows:
    raise ValueError('config.consistency.weight and config.distill.transfer both read '
                     'unlabelled text; set one of them off (weight 0 or transfer \'\')')
  return (uda.stream if uda else transfer_rows), uda


def fine_tuning(config: ml_collections.ConfigDict, lora_cfg: lora.LoraConfig | None,
                workdir: str | None = None) -> ClassificationTask:
  """`config.init.model` with a new head on `config.data`, full, frozen or LoRA. `workdir`:
  the run's, where a rewrite operation keeps its rewrites (required with one)."""
  data = config.data
  shots, augment = training_data_options(config)
  stream, uda = unlabelled_options(config)
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
  augmenter = augment.build(config.seed, start.tokenizer_dir,
                            _rewrites(config, augment, splits['train'], workdir))
  if augmenter is not None:
    report.say(f'Augmentation: {augment.describe()}')
  backbone = start.model.replace(lm_head=False)
  head = HeadConfig(splits.num_classes, config.head.pooling)
  encode = start.encoder(data.max_len)

  processes, me = jax.process_count(), jax.process_index()
  per_process = config.train.batch_size // processes
  eval_split = lambda split, limit: classification.eval_batches(
      subset_order(splits[split], limit), encode, batch_size=per_process, shard_index=me,
      shard_count=processes, max_batches=limit or None)
  train_data = _training_batches(config, splits['train'], encode, augmenter, stream,
                                  cut.unlabelled if cut else None, start.tokenizer_dir)
  if uda is not None:
    report.say(uda.describe())
  validation = eval_split('validation', config.train.eval_batches)
  smoothing = config.head.label_smoothing
  task = Task(
      build_model=lambda rngs: build(backbone, head, rngs),
      loss_fn=(consistency_training.make_loss_fn(uda, classifier_logits, smoothing) if uda
               else _loss_fn(smoothing)),
      eval_fn=eval_fn,
      train_data=train_data,
      eval_data=lambda: validation,
      # Every row the model reads: labelled, and unlabelled in each view.
      count_tokens=lambda batch: sum(v.size for k, v in batch.items() if k.endswith('tokens')),
      pretrained=start.pretrained(head),
      **peft.lora_fields(lora_cfg, config.seed),
  )
  return ClassificationTask(
      task=task, splits=splits, test=eval_split('test', config.test_batches), encode=encode,
      start=start, head=head, counts=peft.count_params(task, config.optim.freeze),
      card=start.card(config.stage, head, lora_cfg, tuple(splits.label_names)),
      unlabelled=cut.unlabelled if cut else None)


def _rewrites(config: ml_collections.ConfigDict, augment: AugmentConfig,
              train: labelled.Split, workdir: str | None) -> Rewrites | None:
  """The training examples' rewrites when a rewrite operation is on, else None."""
  if not (augment.enabled and augment.rewrite):
    return None
  if workdir is None:
    raise ValueError(f'config.data.augment: {augment.rewrite.name} keeps its rewrites in the '
                     f"run's workdir, and this caller gave none")
  teacher = config.get('teacher')  # a distillation's; keep_label_of='teacher' names it
  teacher_dir = (teacher.get('workdir') or os.path.join(workdir, 'teacher')) if teacher else None
  return rewrites_lib.training_rewrites(
      train.texts, augment, seed=config.seed, workdir=workdir, mesh=config.mesh,
      label_batch=config.train.batch_size, teacher_dir=teacher_dir)


def _training_batches(config: ml_collections.ConfigDict, train: labelled.Split,
                      encode: classification.Encode, augmenter: Augmenter | None,
                      stream: UnlabelledConfig | None,
                      rest: labelled.Split | None, tokenizer_dir: str | None
                      ) -> lm_pipeline.ShardedBatches:
  """The data shards this process reads, each with its share of the unlabelled rows if any."""
  shards = distributed.data_shards(config)
  batches = [classification.ClassificationBatches(
      train, encode, batch_size=rows, seed=config.seed, shard_index=shard, shard_count=count,
      balanced=config.data.balanced, augment=augmenter) for shard, rows, count in shards]
  if stream is None:
    return lm_pipeline.ShardedBatches(batches)
  texts = stream.texts(rest, config.data.text_field)
  # A seed of its own: the augmented view of unlabelled text i is not edited by the random
  # numbers that edit labelled example i's copies.
  unlabelled_augmenter = stream.augment.build(config.seed + _UNLABELLED_SEED, tokenizer_dir)
  report.say(f'Unlabelled text: {len(texts)} texts from {stream.source!r}, '
             f'{stream.batch_size} rows per step')
  return lm_pipeline.ShardedBatches([unlabelled.WithUnlabelled(labelled_shard, (
      unlabelled.UnlabelledBatches(texts, encode, batch_size=rows * stream.ratio,
                                   seed=config.seed, shard_index=shard, shard_count=count,
                                   augment=unlabelled_augmenter)))
      for labelled_shard, (shard, rows, count) in zip(batches, shards)])


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


def subset_order(split, limit: int):
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

"""Multi-task classification: one pretrained encoder, one head per task, trained on a mixture.

The heads are one `SequenceClassifier` whose classifier has sum_t C_t outputs, task t owning
a block of columns (`data/multitask.py` `LabelBlocks`). A row's logits outside its task's
block are set to -inf before the softmax, so each task has a softmax of its own: a task's
loss, predictions and gradients do not depend on the other tasks' columns at all, exactly as
with separate heads, while the model stays one ordinary classifier that every existing piece
(loading, LoRA, checkpoints, `finished.load`) already handles, and the step stays one
compiled program for every task (no lax.switch over heads). Label smoothing spreads its mass
over the row's own block only.

Training batches come one task at a time from the mixture (`data/mixture.py`: proportional,
temperature or explicit rates, optional cap). Evaluation scores every task's validation
batches and reports, per task, `<task>/loss` and `<task>/accuracy`, and over the tasks
`loss` and `accuracy` as plain means of the per-task values (each task's rows are weighted by
1 / its number of scored examples, so a large task does not outvote a small one); these are
what early stopping reads. `macro_f1` is that of the block-diagonal confusion matrix, i.e.
the mean F1 over the classes of all tasks. Test scores per task (accuracy, macro-F1, per-class
F1) are cut from the same matrix, block by block.

A task's single-task baseline (`Plan.build(config, alone=task)`) is this same model trained
on that task's batches only: the other blocks' columns never get a gradient, so the task's
outputs are exactly those of a classifier of its own classes started from the same weights
(its block's columns as initialised here), and the baseline runs the very program the mixture
compiled. The comparison then differs in one thing only, the batches of the other tasks.

The model card's labels are 'task/class' per column, so a later stage can recover the blocks
(`LabelBlocks.from_label_names`) from the card alone (a baseline's card is the same: read
its own task's block). Exporting one Hugging Face model per task is not provided: a
multi-task run ends with its report, not an export.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from llmopt_jax import classification_metrics, distributed, lora
from llmopt_jax.data import classification, lm_pipeline, mixture
from llmopt_jax.data.augment.pipeline import Augmenter
from llmopt_jax.data.few_shot import FewShotConfig
from llmopt_jax.data.labelled import LabelledSplits
from llmopt_jax.data.multitask import LabelBlocks, MixedBatches, TaskSource
from llmopt_jax.hf.load import build
from llmopt_jax.models.heads import HeadConfig
from llmopt_jax.tasks import peft, starting_point
from llmopt_jax.tasks.classification import (classifier_logits, subset_order,
                                             training_data_options)
from llmopt_jax.tasks.finished import ModelCard
from llmopt_jax.tasks.starting_point import StartingPoint
from llmopt_jax.train.task import Task

FIELD = 'config.multitask'


@dataclasses.dataclass(frozen=True)
class MultiTaskConfig:
  """`config.multitask`: the tasks and how their batches are mixed."""
  tasks: tuple[TaskSource, ...]
  mixing: str                   # one of mixture.MIXINGS
  temperature: float
  rates: dict[str, float]       # mixing 'explicit': task -> rate (normalised)
  cap: int                      # examples per task counted by the rates; 0 = no cap
  baselines: bool               # also train each task alone, for the report

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> MultiTaskConfig:
    section = config.multitask
    names = (section.tasks,) if isinstance(section.tasks, str) else tuple(section.tasks)
    if not names:
      raise ValueError(f'{FIELD}.tasks is empty; name at least one task (a section of '
                       f'config.tasks: {sorted(config.tasks)})')
    if len(set(names)) < len(names):
      raise ValueError(f'{FIELD}.tasks={names} names a task twice')
    tasks = tuple(TaskSource.from_config(n, config.tasks.get(n)) for n in names)
    raw = (section.rates,) if isinstance(section.rates, str) else tuple(section.rates)
    return cls(tasks, section.mixing, float(section.temperature),
               dict(_rate(i, spec) for i, spec in enumerate(raw)), int(section.cap),
               bool(section.baselines))

  def rates_for(self, sizes: dict[str, int]) -> dict[str, float]:
    """Each task's share of the batches, from its training examples (errors name FIELD)."""
    return mixture.mixture_rates(sizes, self.mixing, temperature=self.temperature,
                                 explicit=self.rates, cap=self.cap, field=FIELD)


def _rate(i: int, spec) -> tuple[str, float]:
  """'task:rate' -> (task, rate)."""
  name, _, value = str(spec).partition(':')
  try:
    return name.strip(), float(value)
  except ValueError:
    raise ValueError(f"{FIELD}.rates[{i}]={spec!r} is not 'task:rate', e.g. "
                     f"'banking77:2'") from None


@dataclasses.dataclass(frozen=True)
class LoadedTask:
  """A task's splits (after any few-shot cut) and its validation and test batches, with
  labels of its own (not yet shifted into a block). Evaluation batches carry
  `task_weights` float32[b] = weights / the examples of the task scored over all processes:
  summed over a whole evaluation they give 1 per task, for means over tasks."""
  source: TaskSource
  splits: LabelledSplits
  validation: list[classification.Batch]
  test: list[classification.Batch]

  @property
  def name(self) -> str:
    return self.source.name


def _load(config: ml_collections.ConfigDict, source: TaskSource, shots: FewShotConfig,
          encode: classification.Encode) -> LoadedTask:
  splits, _ = shots.apply(source.load())
  processes, me = jax.process_count(), jax.process_index()
  rows = config.train.batch_size // processes

  def batches(split: str, limit: int) -> list[classification.Batch]:
    scored = _scored(len(splits[split]), rows, processes, limit)
    return [{**b, 'task_weights': b['weights'] / np.float32(scored)}
            for b in classification.eval_batches(
                subset_order(splits[split], limit), encode, batch_size=rows, shard_index=me,
                shard_count=processes, max_batches=limit or None)]
  return LoadedTask(source, splits, batches('validation', config.train.eval_batches),
                    batches('test', config.test_batches))


def _scored(size: int, rows: int, shards: int, limit: int) -> int:
  """Examples that `classification.eval_batches` scores over all shards (weight total)."""
  per_shard = rows * classification.num_eval_batches(size, rows, shards, limit or None)
  return sum(min(len(range(s, size, shards)), per_shard) for s in range(shards))


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a multi-task run decides before it writes anything: every field checked, every
  task's data loaded (evaluation batches encoded once; the single-task baselines reuse them),
  the mixture's rates and the starting point."""
  spec: MultiTaskConfig
  tasks: tuple[LoadedTask, ...]
  rates: dict[str, float]
  start: StartingPoint
  encode: classification.Encode
  augment: Augmenter | None
  lora: lora.LoraConfig | None

  def build(self, config: ml_collections.ConfigDict, alone: LoadedTask | None = None
            ) -> MultiTask:
    """The run on the mixture, or `alone`'s single-task baseline: the same model (every
    task's block; the others' columns get no gradient, so its task's outputs are exactly
    those of a classifier of its own classes with the same start), trained on that task's
    batches only and scored on it alone. Same shapes, same compiled step as the mixture."""
    rates = self.rates if alone is None else {t.name: float(t is alone) for t in self.tasks}
    scored = self.tasks if alone is None else (alone,)
    return _build(config, self.tasks, scored, rates, self.start, self.encode, self.augment,
                  self.lora)


def plan(config: ml_collections.ConfigDict) -> Plan:
  """The `Plan` of `config`; a bad field or unreadable data is a one-line error."""
  spec = MultiTaskConfig.from_config(config)
  lora_cfg = lora.from_config(config.peft)
  shots, augment = training_data_options(config)
  start = starting_point.resolve(config)
  encode = start.encoder(config.data.max_len)
  tasks = tuple(_load(config, source, shots, encode) for source in spec.tasks)
  rates = spec.rates_for({t.name: len(t.splits['train']) for t in tasks})
  return Plan(spec, tasks, rates, start, encode, augment.build(config.seed, start.tokenizer_dir),
              lora_cfg)


@dataclasses.dataclass(frozen=True)
class MultiTask:
  """The loop's `Task` for a mixture of tasks, and what the report and the card need."""
  task: Task
  blocks: LabelBlocks
  scored: tuple[LoadedTask, ...]   # the tasks it is validated and tested on
  test: list[classification.Batch]
  counts: peft.ParamCounts
  card: ModelCard


def _build(config: ml_collections.ConfigDict, tasks: tuple[LoadedTask, ...],
           scored: tuple[LoadedTask, ...], rates: dict[str, float], start: StartingPoint,
           encode: classification.Encode, augment: Augmenter | None,
           lora_cfg: lora.LoraConfig | None) -> MultiTask:
  """One encoder with a block of classifier columns per task in `tasks`, its training
  batches drawn by `rates`, validated and tested on `scored`."""
  blocks = LabelBlocks(tuple(t.name for t in tasks),
                       tuple(t.splits.num_classes for t in tasks))
  head = HeadConfig(blocks.total, config.head.pooling)
  backbone = start.model.replace(lm_head=False)
  pipelines = {t.name: lm_pipeline.ShardedBatches([
      classification.ClassificationBatches(
          t.splits['train'], encode, batch_size=rows, seed=config.seed, shard_index=shard,
          shard_count=count, balanced=config.data.balanced, augment=augment)
      for shard, rows, count in distributed.data_shards(config)]) for t in tasks}
  validation = [blocks.tag(b, t.name) for t in scored for b in t.validation]
  task = Task(
      build_model=lambda rngs: build(backbone, head, rngs),
      loss_fn=_loss_fn(blocks, config.head.label_smoothing),
      eval_fn=_eval_fn(blocks, tuple(t.name for t in scored)),
      train_data=MixedBatches(pipelines, blocks, mixture.TaskMixture(rates)),
      eval_data=lambda: validation,
      count_tokens=lambda batch: batch['tokens'].size,
      pretrained=start.pretrained(head),
      **peft.lora_fields(lora_cfg, config.seed))
  labels = blocks.label_names([t.splits.label_names for t in tasks])
  return MultiTask(
      task, blocks, scored, [blocks.tag(b, t.name) for t in scored for b in t.test],
      peft.count_params(task, config.optim.freeze),
      start.card(config.stage, head, lora_cfg, labels))


# ---- Heads as blocks of one classifier ------------------------------------------------------

def masked_logits(logits: jax.Array, task: jax.Array, blocks: LabelBlocks
                  ) -> tuple[jax.Array, jax.Array]:
  """(logits [B, C] with every column outside row b's task block at -inf, the block mask)."""
  start = jnp.asarray(blocks.starts, jnp.int32)[task]                     # [B]
  end = start + jnp.asarray(blocks.sizes, jnp.int32)[task]
  columns = jnp.arange(logits.shape[-1])
  inside = (columns >= start[:, None]) & (columns < end[:, None])         # [B, C]
  return jnp.where(inside, logits.astype(jnp.float32), -jnp.inf), inside


def block_losses(masked: jax.Array, labels: jax.Array, inside: jax.Array,
                 label_smoothing: float = 0.0) -> jax.Array:
  """float32[B]: each row's cross-entropy within its block; smoothing puts e / C_t on each
  of the C_t classes of the row's task (the single-task loss of `losses.classification_loss`
  when the block is every column)."""
  log_p = jax.nn.log_softmax(masked, axis=-1)                             # -inf outside
  nll = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
  # where() before the sum: -inf * 0 would be NaN, and its gradient outside is exactly 0.
  spread = -jnp.sum(jnp.where(inside, log_p, 0.0), axis=-1) / jnp.sum(inside, axis=-1)
  return (1.0 - label_smoothing) * nll + label_smoothing * spread


def _loss_fn(blocks: LabelBlocks, label_smoothing: float):
  def loss_fn(model, batch, rngs, context=None):
    del context
    masked, inside = masked_logits(classifier_logits(model, batch, rngs), batch['task'], blocks)
    weights = batch['weights'].astype(jnp.float32)
    loss = block_losses(masked, batch['labels'], inside, label_smoothing)
    correct = (jnp.argmax(masked, axis=-1) == batch['labels']).astype(jnp.float32)
    sums = {'loss': (jnp.sum(loss * weights), jnp.sum(weights)),
            'accuracy': (jnp.sum(correct * weights), jnp.sum(weights))}
    return sums['loss'][0], sums['loss'][1], sums
  return loss_fn


def _eval_fn(blocks: LabelBlocks, scored: tuple[str, ...]):
  """Loss and accuracy of each task in `scored`; their means over those tasks (rows weighted
  by `task_weights`, which sum to 1 per task over an evaluation); the confusion matrix."""
  def eval_fn(model, batch):
    masked, inside = masked_logits(classifier_logits(model, batch), batch['task'], blocks)
    labels, weights = batch['labels'], batch['weights'].astype(jnp.float32)
    values = {'loss': block_losses(masked, labels, inside),
              'accuracy': (jnp.argmax(masked, axis=-1) == labels).astype(jnp.float32)}
    scale = batch['task_weights'].astype(jnp.float32)
    sums = {}
    for metric, value in values.items():
      sums[metric] = (jnp.sum(value * scale), jnp.sum(scale))
      for name in scored:
        mine = weights * (batch['task'] == blocks.names.index(name))
        sums[f'{name}/{metric}'] = (jnp.sum(value * mine), jnp.sum(mine))
    sums['confusion'] = (classification_metrics.confusion_matrix(masked, labels, weights),
                         jnp.sum(weights))
    return sums
  return eval_fn


def task_reports(confusion: np.ndarray, built: MultiTask) -> dict[str, dict]:
  """Each task's test report (accuracy, macro-F1, per-class F1) from its block of the
  summed confusion matrix; predictions never leave a row's block, so the block is exactly
  the task's own matrix."""
  reports = {}
  for task in built.scored:
    start, end = built.blocks.span(task.name)
    oos = 'oos' if task.source.dataset == 'clinc150' else None
    reports[task.name] = classification_metrics.classification_report(
        confusion[start:end, start:end], task.splits.label_names, out_of_scope=oos)
  return reports

"""What distillation and quantization need of a task: classification or language modelling.

A `Problem` gathers the task-specific pieces those stages plug together around a finished
model (a distillation's teacher, a quantization's source): the training task whose data and
evaluation a new model (a student, a fake-quantized copy) trains on, how a model is fed and
read (`ModelIO`), the held-out batches every variant is scored on, the report's quality
columns, latency inputs, the teacher cache, and calibration batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from llmopt_jax import classification_metrics, losses
from llmopt_jax import metrics as metrics_lib
from llmopt_jax.data import classification as classification_data
from llmopt_jax.distill import cache
from llmopt_jax.distill.objective import ModelIO
from llmopt_jax.tasks import classification, finished, lm
from llmopt_jax.train.task import Task


@dataclasses.dataclass(frozen=True)
class Problem:
  description: str
  io: ModelIO
  task: Task                               # data and evaluation; a stage swaps the model in
  eval_fn: Callable[[nnx.Module, dict], Any]
  score_batches: list[dict[str, np.ndarray]]
  quality: Callable[[dict], dict[str, float]]
  quality_columns: tuple[str, ...]
  forward: Callable[[nnx.Module, dict], jax.Array]   # for latency
  make_batch: Callable[[int], dict[str, np.ndarray]]  # n queries, for latency
  # (config, workdir, teacher) -> {'values', 'indices'} of every training example
  teacher_cache: Callable[[ml_collections.ConfigDict, str, finished.FinishedModel],
                          dict[str, np.ndarray]]
  # About n training examples, spread over the training set, in batches (quantization's
  # calibration).
  calibration_batches: Callable[[int], list[dict[str, np.ndarray]]]


def make(config: ml_collections.ConfigDict, source: finished.FinishedModel,
         workdir: str | None = None) -> Problem:
  """The problem of `config.task` around the finished model `source`; `workdir`: the run's
  (where a classification fine-tune's rewrite augmentation keeps its rewrites)."""
  if config.task == 'classification':
    return _classification(config, source, workdir)
  if config.task == 'lm':
    return _language_model(config, source)
  raise ValueError(f"config.task={config.task!r}; choose 'classification' or 'lm'")


def _tile(batch: dict[str, np.ndarray], n: int, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
  """n rows made by cycling the rows of `batch` (for latency, where only shapes matter)."""
  return {k: np.resize(batch[k], (n,) + batch[k].shape[1:]) for k in keys}


# ---- Classification: a fine-tuned encoder ---------------------------------------------------

def classify(model, batch, rngs=None, intermediates=False):
  """(logits, intermediates or None) of a classifier: `ModelIO.forward`."""
  out = classification.classifier_logits(model, batch, rngs, intermediates)
  return out if intermediates else (out, None)


def _classification(config: ml_collections.ConfigDict, source: finished.FinishedModel,
                    workdir: str | None) -> Problem:
  built = classification.fine_tuning(config, None, workdir)
  splits, smoothing = built.splits, config.head.label_smoothing
  if source.card.labels != tuple(splits.label_names):
    raise ValueError(f'the model in {source.workdir} was trained on other labels '
                     f'({source.config.data.name}) than config.data.name={config.data.name}')
  io = ModelIO(
      forward=classify,
      hard_metrics=lambda logits, batch: classification_metrics.classification_sums(
          logits, batch['labels'], batch['weights'], label_smoothing=smoothing,
          confusion=False),
      kd_weights=lambda batch: batch['weights'],
      token_weights=lambda batch: batch['padding_mask'])

  def quality(sums: dict) -> dict[str, float]:
    report = classification_metrics.classification_report(
        sums['confusion'][0], splits.label_names)
    return {'accuracy': report['accuracy'], 'macro_f1': report['macro_f1']}

  def teacher_cache(config, workdir: str, teacher: finished.FinishedModel):
    if jax.process_count() > 1:
      raise ValueError('config.distill.mode=cached builds its cache in a single process')
    train = splits['train']
    k = config.distill.top_k or splits.num_classes
    batches = classification_data.eval_batches(train, built.encode,
                                               batch_size=config.train.batch_size)
    logits = jax.jit(lambda params, batch: classify(
        nnx.merge(teacher.graphdef, params), batch)[0])
    return cache.build(workdir, {'teacher': teacher.workdir}, batches,
                       lambda batch: logits(teacher.params, batch), k, len(train))

  def calibration_batches(n: int) -> list[dict[str, np.ndarray]]:
    train = splits['train']
    every = max(1, len(train) // n)  # a stride, not a prefix: the CSVs are sorted by label
    return classification_data.eval_batches(train, built.encode,
                                            batch_size=config.train.batch_size,
                                            shard_count=every)

  first = built.test[0]
  return Problem(
      description=f'{config.data.name} (test accuracy and macro-F1)', io=io, task=built.task,
      eval_fn=lambda model, batch: classification_metrics.classification_sums(
          classify(model, batch)[0], batch['labels'], batch['weights']),
      score_batches=built.test, quality=quality, quality_columns=('accuracy', 'macro_f1'),
      forward=lambda model, batch: classify(model, batch)[0],
      make_batch=lambda n: _tile(first, n, ('tokens', 'token_types', 'padding_mask')),
      teacher_cache=teacher_cache, calibration_batches=calibration_batches)


# ---- Language modelling: a pretrained decoder ------------------------------------------------

def next_token(model, batch, rngs=None, intermediates=False):
  """(logits, intermediates or None) of a language model: `ModelIO.forward`."""
  out = model(batch['inputs'], rngs=rngs, intermediates=intermediates)
  return out if intermediates else (out, None)


def _language_model(config: ml_collections.ConfigDict, source: finished.FinishedModel) -> Problem:
  # The source's corpus, read through the source's own tokenizer; augmented as this run's
  # config says (lm.training_data_options(config)), not as the source's run was.
  data_config = ml_collections.ConfigDict({**config.to_dict(),
                                           'data': source.config.data.to_dict()})
  tokenizer = finished.lm_tokenizer(source.card, source.workdir)
  augment = lm.training_data_options(config)
  make_task = lambda: lm.next_token_task(data_config, *lm.text_sources(data_config.data),
                                         tokenizer, source.card.build, augment=augment,
                                         tokenizer_dir=source.tokenizer_dir)
  task = make_task()
  io = ModelIO(forward=next_token, hard_metrics=losses.lm_metrics,
               kd_weights=lambda batch: batch['weights'],
               token_weights=lambda batch: batch['weights'])

  def teacher_cache(config, workdir, teacher):
    raise ValueError('config.distill.mode=cached supports the classification tasks only: a '
                     'language model\'s training windows are re-packed every epoch, so there '
                     'is no fixed set of examples to cache')

  def quality(sums: dict) -> dict[str, float]:
    means = metrics_lib.finalize(sums)
    return {'val_loss': means['loss'], 'val_perplexity': means['perplexity']}

  def calibration_batches(n: int) -> list[dict[str, np.ndarray]]:
    data = make_task().train_data  # a fresh pipeline: the task's own stays where it is
    batches = [next(data)]
    while sum(len(b['inputs']) for b in batches) < n:
      batches.append(next(data))
    return batches

  score_batches = list(task.eval_data())
  return Problem(
      description=f'{data_config.data.name} (validation loss and perplexity)', io=io,
      task=task, eval_fn=losses.lm_eval, score_batches=score_batches,
      quality=quality, quality_columns=('val_loss', 'val_perplexity'),
      forward=lambda model, batch: model(batch['inputs']),
      make_batch=lambda n: _tile(score_batches[0], n, ('inputs',)),
      teacher_cache=teacher_cache, calibration_batches=calibration_batches)

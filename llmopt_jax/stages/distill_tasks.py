"""What distillation needs to know about its task: classification or language modelling.

A `Problem` gathers the task-specific pieces the distill stage plugs together: how to rebuild
the teacher's run from its workdir, the student's data and evaluation (a fine-tune's or a
pretrain's `Task`), how a model is fed and read (`ModelIO`), the held-out batches every model
is scored on, and the quality columns of the report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from llmopt_jax import classification_metrics, lora, losses
from llmopt_jax import metrics as metrics_lib
from llmopt_jax.data import classification
from llmopt_jax.distill import cache
from llmopt_jax.distill.objective import ModelIO
from llmopt_jax.stages import finetune, pretrain
from llmopt_jax.train import loop, trained


@dataclasses.dataclass(frozen=True)
class Problem:
  description: str
  io: ModelIO
  teacher_task: Callable[[ml_collections.ConfigDict, str], loop.Task]
  student_task: loop.Task                  # data and evaluation; the stage swaps the model in
  eval_fn: Callable[[nnx.Module, dict], Any]
  score_batches: list[dict[str, np.ndarray]]
  quality: Callable[[dict], dict[str, float]]
  quality_columns: tuple[str, ...]
  forward: Callable[[nnx.Module, dict], jax.Array]   # for latency
  make_batch: Callable[[int], dict[str, np.ndarray]]  # n queries, for latency
  # (config, workdir, teacher) -> {'values', 'indices'} of every training example
  teacher_cache: Callable[[ml_collections.ConfigDict, str, Any], dict[str, np.ndarray]]
  # About n training examples, spread over the training set, in batches (quantization's
  # calibration).
  calibration_batches: Callable[[int], list[dict[str, np.ndarray]]]


def make(config: ml_collections.ConfigDict, teacher_dir: str) -> Problem:
  if config.task == 'classification':
    return _classification(config)
  if config.task == 'lm':
    return _language_model(config, teacher_dir)
  raise ValueError(f"config.task={config.task!r}; choose 'classification' or 'lm'")


def _tile(batch: dict[str, np.ndarray], n: int, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
  """n rows made by cycling the rows of `batch` (for latency, where only shapes matter)."""
  return {k: np.resize(batch[k], (n,) + batch[k].shape[1:]) for k in keys}


# ---- Classification: a fine-tuned encoder into a shallower one -----------------------------

def _classify(model, batch, rngs=None, intermediates=False):
  out = finetune.classifier_logits(model, batch, rngs, intermediates)
  return out if intermediates else (out, None)


def _classification(config: ml_collections.ConfigDict) -> Problem:
  task, parts = finetune.build_task(config, None)
  splits, smoothing = parts['splits'], config.head.label_smoothing
  io = ModelIO(
      forward=_classify,
      hard_metrics=lambda logits, batch: classification_metrics.classification_sums(
          logits, batch['labels'], batch['weights'], label_smoothing=smoothing,
          confusion=False),
      kd_weights=lambda batch: batch['weights'],
      token_weights=lambda batch: batch['padding_mask'])

  def teacher_task(teacher_config: ml_collections.ConfigDict, teacher_dir: str) -> loop.Task:
    teacher, teacher_parts = finetune.build_task(teacher_config, lora.from_config(
        teacher_config.peft))
    if teacher_parts['splits'].label_names != splits.label_names:
      raise ValueError(f'the teacher in {teacher_dir} was trained on other labels '
                       f'({teacher_config.data.name}) than config.data.name={config.data.name}')
    return teacher

  def quality(sums: dict) -> dict[str, float]:
    report = classification_metrics.classification_report(
        sums['confusion'][0], splits.label_names)
    return {'accuracy': report['accuracy'], 'macro_f1': report['macro_f1']}

  def teacher_cache(config, workdir: str, teacher) -> dict[str, np.ndarray]:
    if jax.process_count() > 1:
      raise ValueError('config.distill.mode=cached builds its cache in a single process')
    train = splits['train']
    k = config.distill.top_k or splits.num_classes
    batches = classification.eval_batches(train, parts['encode'],
                                          batch_size=config.train.batch_size)
    logits = jax.jit(lambda params, batch: _classify(
        nnx.merge(teacher.graphdef, params), batch)[0])
    return cache.build(workdir, {'teacher': teacher.workdir}, batches,
                       lambda batch: logits(teacher.params, batch), k, len(train))

  def calibration_batches(n: int) -> list[dict[str, np.ndarray]]:
    train = splits['train']
    every = max(1, len(train) // n)  # a stride, not a prefix: the CSVs are sorted by label
    return classification.eval_batches(train, parts['encode'], batch_size=config.train.batch_size,
                                       shard_count=every)

  first = parts['test'][0]
  return Problem(
      description=f'{config.data.name} (test accuracy and macro-F1)', io=io,
      teacher_task=teacher_task, student_task=task,
      eval_fn=lambda model, batch: classification_metrics.classification_sums(
          _classify(model, batch)[0], batch['labels'], batch['weights']),
      score_batches=parts['test'], quality=quality, quality_columns=('accuracy', 'macro_f1'),
      forward=lambda model, batch: _classify(model, batch)[0],
      make_batch=lambda n: _tile(first, n, ('tokens', 'token_types', 'padding_mask')),
      teacher_cache=teacher_cache, calibration_batches=calibration_batches)


# ---- Language modelling: a pretrained decoder into a shallower one -------------------------

def _next_token(model, batch, rngs=None, intermediates=False):
  out = model(batch['inputs'], rngs=rngs, intermediates=intermediates)
  return out if intermediates else (out, None)


def _language_model(config: ml_collections.ConfigDict, teacher_dir: str) -> Problem:
  # The student reads the teacher's corpus through the teacher's tokenizer.
  student_config = ml_collections.ConfigDict(config.to_dict())
  student_config.data = trained.read_config(teacher_dir).data
  task, _ = pretrain.build_task(student_config, teacher_dir)
  io = ModelIO(forward=_next_token, hard_metrics=losses.lm_metrics,
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
    # A fresh pipeline: the task's own iterator is left where training expects it.
    data = pretrain.build_task(student_config, teacher_dir)[0].train_data
    batches = [next(data)]
    while sum(len(b['inputs']) for b in batches) < n:
      batches.append(next(data))
    return batches

  score_batches = list(task.eval_data())
  return Problem(
      description=f'{student_config.data.name} (validation loss and perplexity)', io=io,
      teacher_task=lambda teacher_config, teacher_dir: pretrain.build_task(
          teacher_config, teacher_dir)[0],
      student_task=task, eval_fn=losses.lm_eval, score_batches=score_batches,
      quality=quality, quality_columns=('val_loss', 'val_perplexity'),
      forward=lambda model, batch: model(batch['inputs']),
      make_batch=lambda n: _tile(score_batches[0], n, ('inputs',)),
      teacher_cache=teacher_cache, calibration_batches=calibration_batches)

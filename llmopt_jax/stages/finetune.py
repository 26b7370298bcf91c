"""Stage `finetune`: a pretrained model fine-tuned as a sequence classifier.

Chain: labelled texts (Banking77, CLINC150 or a user's CSV/TSV/JSONL) -> the starting point's
own tokenizer -> pretrained backbone (a Hugging Face model, or a pretrain workdir's decoder:
`starting_point`) + a new pooling/classification head -> the shared loop (full fine-tuning,
frozen parts, or LoRA) -> the best checkpoint scored on the test split (accuracy, macro-F1,
per-class F1) -> report.json/report.md and a merged Hugging Face export (`finetune_export`).
The causal-LM variant (`finetune_lm`) shares the PEFT wiring, counting and report writing.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from llmopt_jax import classification_metrics, distributed, lora, optim
from llmopt_jax import workdir as workdir_lib
from llmopt_jax.data import classification, intents, labelled, lm_pipeline
from llmopt_jax.hf.load import build
from llmopt_jax.models.heads import HeadConfig
from llmopt_jax.stages import finetune_export, starting_point
from llmopt_jax.train import loop, trained


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  workdir_lib.prepare(workdir, config)
  lora_cfg = lora.from_config(config.peft)
  optim.make_optimizer(config.optim, config.train.num_steps)  # a bad field fails before data work
  started = time.perf_counter()
  task, parts = build_task(config, lora_cfg)
  describe(parts, config, f'{config.data.name} {parts["sizes"]}, {parts["head"].num_labels} '
           f'classes')
  summary = loop.train(config, workdir, task)
  sums = trained.evaluate_checkpoint(config, workdir, task, summary['best_step'], parts['test'])
  report = classification_metrics.classification_report(
      sums['confusion'][0], parts['splits'].label_names,
      out_of_scope='oos' if config.data.name == 'clinc150' else None)
  report.update(best_step=summary['best_step'], wall_time_s=time.perf_counter() - started,
                trainable_params=parts['trainable'], total_params=parts['total'],
                data=parts['splits'].metadata(), model=parts['model_dir'],
                peft=config.peft.method)
  write_report(workdir, report, [
      ('test accuracy', f'{report["accuracy"]:.4f}'),
      ('test macro-F1', f'{report["macro_f1"]:.4f}'),
  ], f'Test accuracy {report["accuracy"]:.4f}, macro-F1 {report["macro_f1"]:.4f}')
  exported = finetune_export.export(config, workdir, task, parts['start'], head=parts['head'],
                                    labels=parts['splits'].label_names)
  return {**summary, 'test': report, 'export': exported}


def build_task(config: ml_collections.ConfigDict,
               lora_cfg: lora.LoraConfig | None) -> tuple[loop.Task, dict[str, Any]]:
  """The loop's Task for classification, and what the report needs (splits, test batches)."""
  data = config.data
  splits = intents.load(
      data.name, path=data.path, text_field=data.text_field, label_field=data.label_field,
      validation_path=data.validation_path, test_path=data.test_path,
      validation_fraction=data.validation_fraction)
  if 'test' not in splits.splits:
    raise ValueError(f'config.data: {data.name} has no test split; set config.data.test_path')
  start = starting_point.resolve(config)
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
          shard_count=count, balanced=data.balanced)
      for shard, rows, count in distributed.data_shards(config)])
  validation = eval_split('validation', config.train.eval_batches)
  smoothing = config.head.label_smoothing

  def loss_fn(model, batch, rngs, context=None):
    del context
    sums = classification_metrics.classification_sums(
        classifier_logits(model, batch, rngs), batch['labels'], batch['weights'],
        label_smoothing=smoothing, confusion=False)
    return sums['loss'][0], sums['loss'][1], sums

  def eval_fn(model, batch):
    return classification_metrics.classification_sums(
        classifier_logits(model, batch), batch['labels'], batch['weights'])

  task = loop.Task(
      build_model=lambda rngs: build(backbone, head, rngs),
      loss_fn=loss_fn,
      eval_fn=eval_fn,
      train_data=train_data,
      eval_data=lambda: validation,
      count_tokens=lambda batch: batch['tokens'].size,
      pretrained=start.pretrained(head),
      **peft_fields(lora_cfg, config.seed),
  )
  trainable, total = count_params(task, config)
  parts = dict(splits=splits, test=eval_split('test', config.test_batches), encode=encode,
               model_dir=start.path, trainable=trainable, total=total, start=start, head=head,
               sizes={name: len(split) for name, split in splits.splits.items()})
  return task, parts


def peft_fields(lora_cfg: lora.LoraConfig | None, seed: int) -> dict[str, Any]:
  """The `Task` fields of LoRA (none without it): adapters added at init, merged in every
  step, base weights frozen."""
  if lora_cfg is None:
    return {}
  return dict(
      extend_params=lambda p: lora.add_adapters(p, lora_cfg, jax.random.key(seed)),
      params_transform=lora.params_transform(lora_cfg),
      frozen=lora.is_frozen(lora_cfg))


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


def count_params(task: loop.Task, config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(trainable, total) parameter entries of the trainable tree, from shapes alone."""
  def params():
    p = nnx.state(task.build_model(nnx.Rngs(0)), nnx.Param)
    return p if task.extend_params is None else task.extend_params(p)
  abstract = jax.eval_shape(params)
  mask = optim.trainable_mask(abstract, config.optim.get('freeze', ()), task.frozen)
  return lora.count_trainable(abstract, mask)


def describe(parts: dict[str, Any], config: ml_collections.ConfigDict, data: str) -> None:
  """One line on what is fine-tuned on what, and how much of it trains."""
  if jax.process_index() != 0:
    return
  print(f'Fine-tuning {parts["model_dir"]} ({parts["start"].source}) on {data}; trainable '
        f'parameters {parts["trainable"]:,} of {parts["total"]:,} '
        f'({100 * parts["trainable"] / parts["total"]:.2f}%, peft={config.peft.method}).',
        flush=True)


def write_report(workdir: str, report: dict[str, Any], rows: list[tuple[str, str]],
                 headline: str) -> None:
  """report.json (everything) and report.md (the headline `rows`, then best step,
  parameters and wall time); `headline` is also printed."""
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, 'report.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2)
  rows = rows + [
      ('best step', str(report['best_step'])),
      ('trainable / total parameters',
       f'{report["trainable_params"]:,} / {report["total_params"]:,}'),
      ('wall time', f'{report["wall_time_s"]:.0f} s'),
  ]
  lines = ['| metric | value |', '| --- | --- |'] + [f'| {k} | {v} |' for k, v in rows]
  with open(os.path.join(workdir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')
  print(f'{headline} (best step {report["best_step"]}); report in {workdir}/report.md',
        flush=True)

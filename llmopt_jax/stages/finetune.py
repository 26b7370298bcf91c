"""Stage `finetune`: a pretrained Hugging Face model fine-tuned as a sequence classifier.

Chain: labelled texts (Banking77, CLINC150 or a user's CSV/TSV/JSONL) -> the checkpoint's own
tokenizer -> pretrained backbone + a new pooling/classification head -> the shared loop
(full fine-tuning, frozen parts, or LoRA) -> the best checkpoint scored on the test split
(accuracy, macro-F1, per-class F1) -> report.json/report.md and a merged Hugging Face export.
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

from llmopt_jax import classification_metrics, distributed, hf, lora, optim
from llmopt_jax import workdir as workdir_lib
from llmopt_jax.data import classification, intents, labelled, lm_pipeline
from llmopt_jax.hf import configs as hf_configs
from llmopt_jax.hf.load import build, read_config
from llmopt_jax.models.heads import HeadConfig
from llmopt_jax.train import loop, trained


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  workdir_lib.prepare(workdir, config)
  lora_cfg = lora.from_config(config.peft)
  optim.make_optimizer(config.optim, config.train.num_steps)  # a bad field fails before data work
  started = time.perf_counter()
  task, parts = build_task(config, lora_cfg)
  _describe(task, parts, config)
  summary = loop.train(config, workdir, task)
  sums = trained.evaluate_checkpoint(config, workdir, task, summary['best_step'], parts['test'])
  report = classification_metrics.classification_report(
      sums['confusion'][0], parts['splits'].label_names,
      out_of_scope='oos' if config.data.name == 'clinc150' else None)
  report.update(best_step=summary['best_step'], wall_time_s=time.perf_counter() - started,
                trainable_params=parts['trainable'], total_params=parts['total'],
                data=parts['splits'].metadata(), model=parts['model_dir'],
                peft=config.peft.method)
  _write_report(workdir, report)
  return {**summary, 'test': report}


def _model_dir(config: ml_collections.ConfigDict) -> str:
  return hf.minilm_path() if config.init.model == 'minilm' else config.init.model


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
  model_dir = _model_dir(config)
  tokenizer = hf.load_tokenizer(model_dir, data.max_len)
  backbone, _ = hf_configs.from_hf(read_config(model_dir))
  backbone = backbone.replace(dropout_rate=config.init.dropout_rate, lm_head=False)
  head = HeadConfig(splits.num_classes, config.head.pooling)

  def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    batch = tokenizer(texts)
    types = batch.get('token_types', np.zeros_like(batch['tokens']))
    return batch['tokens'], batch['padding_mask'], types

  def pretrained(mesh, rules) -> nnx.State:
    model, _ = hf.load_pretrained(model_dir, mesh=mesh, rules=rules, head=head,
                                  seed=config.seed, dropout_rate=config.init.dropout_rate)
    return nnx.state(model, nnx.Param)

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
        _logits(model, batch, rngs), batch['labels'], batch['weights'],
        label_smoothing=smoothing, confusion=False)
    return sums['loss'][0], sums['loss'][1], sums

  def eval_fn(model, batch):
    return classification_metrics.classification_sums(
        _logits(model, batch, None), batch['labels'], batch['weights'])

  task = loop.Task(
      build_model=lambda rngs: build(backbone, head, rngs),
      loss_fn=loss_fn,
      eval_fn=eval_fn,
      train_data=train_data,
      eval_data=lambda: validation,
      count_tokens=lambda batch: batch['tokens'].size,
      pretrained=pretrained,
      extend_params=None if lora_cfg is None else (
          lambda p: lora.add_adapters(p, lora_cfg, jax.random.key(config.seed))),
      params_transform=None if lora_cfg is None else lora.params_transform(lora_cfg),
      frozen=None if lora_cfg is None else lora.is_frozen(lora_cfg),
  )
  trainable, total = _count(task, config)
  parts = dict(splits=splits, test=eval_split('test', config.test_batches), model_dir=model_dir,
               trainable=trainable, total=total)
  return task, parts


def _subset_order(split, limit: int):
  """The split itself, or, when only `limit` batches are scored, the split in a fixed random
  order, so the scored subset covers the classes (the files are sorted by class)."""
  if not limit:
    return split
  order = np.random.default_rng(0).permutation(len(split))
  return labelled.Split(tuple(split.texts[i] for i in order), split.labels[order])


def _logits(model, batch, rngs):
  return model(batch['tokens'], token_types=batch['token_types'],
               padding_mask=batch['padding_mask'], rngs=rngs)


def _count(task: loop.Task, config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(trainable, total) parameter entries of the trainable tree, from shapes alone."""
  def params():
    p = nnx.state(task.build_model(nnx.Rngs(0)), nnx.Param)
    return p if task.extend_params is None else task.extend_params(p)
  abstract = jax.eval_shape(params)
  mask = optim.trainable_mask(abstract, config.optim.get('freeze', ()), task.frozen)
  return lora.count_trainable(abstract, mask)


def _describe(task: loop.Task, parts: dict[str, Any], config: ml_collections.ConfigDict) -> None:
  if jax.process_index() != 0:
    return
  sizes = {name: len(split) for name, split in parts['splits'].splits.items()}
  print(f'Fine-tuning {parts["model_dir"]} on {config.data.name} {sizes}, '
        f'{parts["splits"].num_classes} classes; trainable parameters {parts["trainable"]:,} '
        f'of {parts["total"]:,} ({100 * parts["trainable"] / parts["total"]:.2f}%, '
        f'peft={config.peft.method}).', flush=True)


def _write_report(workdir: str, report: dict[str, Any]) -> None:
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, 'report.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2)
  lines = [
      '| metric | value |', '| --- | --- |',
      f'| test accuracy | {report["accuracy"]:.4f} |',
      f'| test macro-F1 | {report["macro_f1"]:.4f} |',
      f'| best step | {report["best_step"]} |',
      f'| trainable / total parameters | {report["trainable_params"]:,} / '
      f'{report["total_params"]:,} |',
      f'| wall time | {report["wall_time_s"]:.0f} s |',
  ]
  with open(os.path.join(workdir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')
  print(f'Test accuracy {report["accuracy"]:.4f}, macro-F1 {report["macro_f1"]:.4f} '
        f'(best step {report["best_step"]}); report in {workdir}/report.md', flush=True)

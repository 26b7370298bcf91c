"""Stage `finetune`: a pretrained model fine-tuned as a sequence classifier.

Chain: labelled texts -> the starting point's tokenizer -> its pretrained backbone + a new
pooling/classification head (`tasks/classification.py`, `tasks/starting_point.py`) -> the
shared loop (full fine-tuning, frozen parts, or LoRA) -> the best checkpoint scored on the
test split (accuracy, macro-F1, per-class F1) -> report.json/report.md, the model card and a
merged Hugging Face export (`tasks/export.py`). Fields: configs/finetune.py.
"""

from __future__ import annotations

import time
from typing import Any

import ml_collections

from llmopt_jax import classification_metrics, lora, report, workdir as workdir_lib
from llmopt_jax.tasks import classification, export, finished, peft
from llmopt_jax.train import loop, trained
from llmopt_jax.train.config import TrainConfig


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  train = TrainConfig.from_config(config)  # every bad field fails before anything is written
  lora_cfg = lora.from_config(config.peft)
  # Checked here too (fine_tuning reads them again), so a bad data field is one line and an
  # untouched workdir.
  classification.training_data_options(config)
  classification.unlabelled_options(config)
  workdir_lib.prepare(workdir, config)
  started = time.perf_counter()
  built = classification.fine_tuning(config, lora_cfg, workdir)
  report.say(peft.describe(built.start.path, built.start.source,
                           f'{config.data.name} {built.sizes}, {built.head.num_labels} classes',
                           built.counts, config.peft.method))
  summary = loop.train(train, workdir, built.task)
  finished.write_card(workdir, built.card)
  sums = trained.evaluate_checkpoint(train, workdir, built.task, summary['best_step'],
                                     built.test)
  record = classification_metrics.classification_report(
      sums['confusion'][0], built.splits.label_names,
      out_of_scope='oos' if config.data.name == 'clinc150' else None)
  record.update(best_step=summary['best_step'], wall_time_s=time.perf_counter() - started,
                trainable_params=built.counts.trainable, total_params=built.counts.total,
                data=built.splits.metadata(), model=built.start.path, peft=config.peft.method)
  report.write_metrics(workdir, record, [
      ('test accuracy', f'{record["accuracy"]:.4f}'),
      ('test macro-F1', f'{record["macro_f1"]:.4f}'),
      *report.fine_tune_rows(record),
  ], f'Test accuracy {record["accuracy"]:.4f}, macro-F1 {record["macro_f1"]:.4f} (best step '
     f'{record["best_step"]})')
  exported = export.export(train, workdir, built.task, built.start,
                           enabled=config.get('export', True), head=built.head,
                           labels=built.splits.label_names)
  return {**summary, 'test': record, 'export': exported}


"""Stage `finetune_lm`: a pretrained causal LM fine-tuned on a text corpus.

Chain: a corpus (shipped tiny Shakespeare, any prepared TFDS text set, or a user's .txt),
packed exactly as pretraining packs it -> the starting point's tokenizer and decoder (a
Hugging Face *ForCausalLM, or a pretrain workdir; `tasks/starting_point.py`) -> the shared loop
(full fine-tuning, `optim.freeze`, or LoRA) -> validation loss and perplexity of the starting
model (step 0, scored before training) and of the best checkpoint -> report.json/report.md,
the model card and a merged *ForCausalLM export (`tasks/export.py`).
Fields: configs/finetune.py (task=lm).
"""

from __future__ import annotations

import time
from typing import Any

import ml_collections

from llmopt_jax import lora, metrics, report, workdir as workdir_lib
from llmopt_jax.tasks import export, finished, lm, peft, starting_point
from llmopt_jax.train import loop, trained
from llmopt_jax.train.config import TrainConfig


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  train = TrainConfig.from_config(config)  # every bad field fails before anything is written
  lora_cfg = lora.from_config(config.peft)
  lm.training_data_options(config)  # a bad data.augment, too
  workdir_lib.prepare(workdir, config)
  started = time.perf_counter()
  built = lm.fine_tuning(config, starting_point.resolve(config, causal=True), lora_cfg)
  report.say(peft.describe(built.start.path, built.start.source,
                           f'{config.data.name} ({config.data.seq_len}-token rows)',
                           built.counts, config.peft.method))
  validation = list(built.task.eval_data())
  start = starting_point.evaluate(train, built.task, validation)
  report.say(f'step 0 (the starting model): eval/loss={start["loss"]:.4f}, '
             f'eval/perplexity={start["perplexity"]:.2f}')
  summary = loop.train(train, workdir, built.task)
  finished.write_card(workdir, built.card)
  step = trained.best_step(workdir)
  best = metrics.finalize(trained.evaluate_checkpoint(train, workdir, built.task, step,
                                                      validation))
  record = dict(
      validation={'start': start, 'best': best}, best_step=step,
      wall_time_s=time.perf_counter() - started, trainable_params=built.counts.trainable,
      total_params=built.counts.total, data=config.data.name, model=built.start.path,
      peft=config.peft.method)
  report.write_metrics(workdir, record, [
      ('validation loss: step 0 -> best', f'{start["loss"]:.4f} -> {best["loss"]:.4f}'),
      ('validation perplexity: step 0 -> best',
       f'{start["perplexity"]:.2f} -> {best["perplexity"]:.2f}'),
      *report.fine_tune_rows(record),
  ], f'Validation perplexity {start["perplexity"]:.2f} at step 0, {best["perplexity"]:.2f} '
     f'fine-tuned (best step {step})')
  exported = export.export(train, workdir, built.task, built.start,
                           enabled=config.get('export', True))
  return {**summary, 'validation': record['validation'], 'export': exported}

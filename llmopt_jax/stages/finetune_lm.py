"""Stage `finetune_lm`: a pretrained causal LM fine-tuned on a text corpus.

Chain: a corpus (shipped tiny Shakespeare, any prepared TFDS text set, or a user's .txt),
read and packed exactly as pretraining packs it (`pretrain.text_sources`, `pretrain.lm_task`)
-> the starting point's tokenizer (a Hugging Face model's tokenizer.json, or a pretrain
workdir's BPE or bytes) -> its pretrained decoder (`starting_point`) -> the shared loop (full
fine-tuning, `optim.freeze`, or LoRA) -> validation loss and perplexity of the starting model
(step 0, scored before training) and of the best checkpoint -> report.json/report.md and a
merged *ForCausalLM export (`finetune_export`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import ml_collections

from llmopt_jax import lora, metrics, optim
from llmopt_jax import workdir as workdir_lib
from llmopt_jax.models.transformer import Transformer
from llmopt_jax.stages import finetune, finetune_export, pretrain, starting_point
from llmopt_jax.train import loop, trained


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  workdir_lib.prepare(workdir, config)
  lora_cfg = lora.from_config(config.peft)
  optim.make_optimizer(config.optim, config.train.num_steps)  # a bad field fails before data work
  started = time.perf_counter()
  task, parts = build_task(config, lora_cfg)
  finetune.describe(parts, config, f'{config.data.name} ({config.data.seq_len}-token rows)')
  validation = list(task.eval_data())
  start = starting_point.evaluate(config, task, validation)
  _say(f'step 0 (the starting model): eval/loss={start["loss"]:.4f}, '
       f'eval/perplexity={start["perplexity"]:.2f}')
  summary = loop.train(config, workdir, task)
  step = trained.best_step(workdir)
  best = metrics.finalize(trained.evaluate_checkpoint(config, workdir, task, step, validation))
  report = dict(
      validation={'start': start, 'best': best}, best_step=step,
      wall_time_s=time.perf_counter() - started, trainable_params=parts['trainable'],
      total_params=parts['total'], data=config.data.name, model=parts['model_dir'],
      peft=config.peft.method)
  finetune.write_report(workdir, report, [
      ('validation loss: step 0 -> best', f'{start["loss"]:.4f} -> {best["loss"]:.4f}'),
      ('validation perplexity: step 0 -> best',
       f'{start["perplexity"]:.2f} -> {best["perplexity"]:.2f}'),
  ], f'Validation perplexity {start["perplexity"]:.2f} at step 0, {best["perplexity"]:.2f} '
     f'fine-tuned')
  exported = finetune_export.export(config, workdir, task, parts['start'])
  return {**summary, 'validation': report['validation'], 'export': exported}


def build_task(config: ml_collections.ConfigDict,
               lora_cfg: lora.LoraConfig | None) -> tuple[loop.Task, dict[str, Any]]:
  """The loop's Task for next-token prediction from the starting point, and what the report
  needs ('model_dir', 'start', 'trainable', 'total'; the keys `finetune.build_task` shares)."""
  start = starting_point.resolve(config, causal=True)
  model, data = start.model, config.data
  if model.max_positions and data.seq_len > model.max_positions:
    raise ValueError(f'config.data.seq_len={data.seq_len} exceeds the {model.max_positions} '
                     f'positions of {config.init.model}')
  tokenizer = start.lm_tokenizer()
  if tokenizer.vocab_size > model.vocab_size:
    raise ValueError(f'config.init.model={start.path}: its tokenizer has {tokenizer.vocab_size} '
                     f'ids but the model only {model.vocab_size}')
  train_source, eval_source = pretrain.text_sources(data)
  task = pretrain.lm_task(config, train_source, eval_source, tokenizer,
                          lambda rngs: Transformer(model, rngs=rngs))
  task = dataclasses.replace(task, pretrained=start.pretrained(None),
                             **finetune.peft_fields(lora_cfg, config.seed))
  trainable, total = finetune.count_params(task, config)
  return task, dict(model_dir=start.path, start=start, trainable=trainable, total=total)


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


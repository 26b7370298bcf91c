"""The Hugging Face export that ends every fine-tune: `<workdir>/export/`.

The best checkpoint, LoRA adapters merged, goes out as a directory transformers loads:
config.json + model.safetensors + the starting point's tokenizer files. A causal LM as its
*ForCausalLM (GPT2LMHeadModel); a classifier as *ForSequenceClassification where HF pools as
its head does, else as the base model plus head.safetensors/head.json
(`hf.export_classifier`). Process 0 writes into `export.tmp/` and renames it into place, so a
run killed mid-export leaves no half directory that a rerun would mistake for a finished one;
a rerun of a finished workdir finds `export/` and leaves it alone. `config.export = False`
turns it off.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

import jax

from llmopt_jax import distributed, hf, report
from llmopt_jax.data import tokenizers
from llmopt_jax.models.heads import HeadConfig

from llmopt_jax.tasks.starting_point import StartingPoint
from llmopt_jax.train import trained
from llmopt_jax.train.config import TrainConfig
from llmopt_jax.train.task import Task

EXPORT_DIR = 'export'

def export(train: TrainConfig, workdir: str, task: Task, start: StartingPoint, *,
           enabled: bool = True, head: HeadConfig | None = None,
           labels: Sequence[str] | None = None) -> str | None:
  """Exports the best checkpoint of the finished fine-tune in `workdir`; returns the
  directory (None when `enabled`, i.e. `config.export`, is off). Every process calls it.

  Args:
    train, task: the fine-tune's `TrainConfig` and `Task` (the model is restored through
      them).
    start: where the fine-tune started; its tokenizer goes along.
    head: the classification head, or None for a causal LM.
    labels: class names, for id2label.
  """
  out = os.path.join(workdir, EXPORT_DIR)
  if not enabled:
    report.say('config.export is False: no Hugging Face export.')
    return None
  if distributed.max_over_processes(int(os.path.exists(out))):
    report.say(f'{out} exists (written by an earlier run in this workdir); not exporting again.')
    return out
  _, params = trained.load_params(train, workdir, task)  # best step, adapters merged
  tmp = out + '.tmp'
  if jax.process_index() == 0 and os.path.exists(tmp):
    shutil.rmtree(tmp)  # left by a run killed while exporting
  distributed.barrier('export_clean')
  tokenizer_dir = start.tokenizer_dir
  if head is None:
    hf.export(params, start.model, tmp, tokenizer_dir=tokenizer_dir, pad_token_id=start.pad_id)
  else:
    hf.export_classifier(params, start.model.replace(lm_head=False), head, tmp, labels=labels,
                         tokenizer_dir=tokenizer_dir, pad_token_id=start.pad_id)
  if jax.process_index() == 0:
    if start.source == 'pretrain' and tokenizer_dir is not None:
      _tokenizer_config(tmp)
    os.replace(tmp, out)
  distributed.barrier('export_done')
  if jax.process_index() == 0:
    byte_note = ('' if tokenizer_dir else '; no tokenizer file is written: the model reads '
                 f'UTF-8 bytes (ids 0-255, pad {tokenizers.ByteTokenizer.pad_id}, eos '
                 f'{tokenizers.ByteTokenizer.eos_id})')
    report.say(f'Hugging Face export in {out}: {", ".join(sorted(os.listdir(out)))}{byte_note}.')
  return out

def _tokenizer_config(out: str) -> None:
  """Tells transformers' AutoTokenizer what our BPE's tokenizer.json is: a plain fast
  tokenizer with our pad and eos tokens (from config.json's model_type it would guess a
  family tokenizer and add that family's BOS, which our vocabulary lacks)."""
  with open(os.path.join(out, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
    json.dump({'tokenizer_class': 'PreTrainedTokenizerFast', 'pad_token': tokenizers.PAD,
               'eos_token': tokenizers.EOS}, f, indent=2)


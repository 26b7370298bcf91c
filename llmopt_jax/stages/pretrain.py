"""Stage `pretrain`: a decoder-only LM trained with next-token prediction on a text corpus.

Chain: corpus (a TFDS text set; shipped: tiny Shakespeare) -> tokenizer (bytes, or BPE
trained on the train split and kept in the workdir) -> packed sequences -> the shared loop ->
the model card (`model.json`) that later stages load the run by. Fields: configs/pretrain.py.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from llmopt_jax import report, workdir as workdir_lib
from llmopt_jax.models import stats
from llmopt_jax.tasks import finished, lm
from llmopt_jax.train import loop
from llmopt_jax.train.config import TrainConfig


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  train = TrainConfig.from_config(config)  # every bad field fails before anything is written
  lm.training_data_options(config)  # a bad data.augment, too
  workdir_lib.prepare(workdir, config)
  built = lm.pretraining(config, workdir)
  model, tokens = built.card.model, train.batch_size * config.data.seq_len
  report.say(f'Model: {stats.count_params(model) / 1e6:.2f}M parameters, vocab '
             f'{model.vocab_size}, {stats.flops_per_token(model, config.data.seq_len) / 1e6:.1f} '
             f'MFLOPs per training token; {tokens} tokens per step, {train.num_steps} steps.')
  summary = loop.train(train, workdir, built.task)
  finished.write_card(workdir, built.card)
  return summary

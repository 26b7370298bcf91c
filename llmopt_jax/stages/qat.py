"""Stage `qat`: quantization-aware training from a finished run, beside PTQ of the same run.

Chain: the source (as in the `ptq` stage) -> for every recipe in `config.variants`: the PTQ
row, then a QAT run in <workdir>/qat-<recipe>/ (`quant/qat_task.py`: the source's weights
trained through fake quantization, optionally distilled from the float source) -> the best
QAT checkpoint rounded to integers, written to <workdir>/qat-<recipe>/quantized/ and scored
beside float32, bfloat16 and PTQ -> report.md / .json.

The QAT runs go through the shared loop (checkpoints, resumption, early stopping on the
fake-quantized model's validation metric); the float source is never modified.
Fields: configs/qat.py and `llmopt_jax/quant/config.py` (`QuantConfig`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import ml_collections

from llmopt_jax import report, stages, workdir as workdir_lib
from llmopt_jax.quant import qat_task, recipes as recipes_lib, scorer as scorer_lib, transform
from llmopt_jax.train import loop, trained
from llmopt_jax.train.config import TrainConfig


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  train = TrainConfig.from_config(config)  # every bad field fails before anything is written
  recipes = recipes_lib.recipes(config, 'variants')
  qat_task.check_distill(config)
  workdir_lib.prepare(workdir, config)
  started = time.perf_counter()
  source_dir = stages.finished_source(config, workdir)
  scorer = scorer_lib.Scorer.of(config, workdir, source_dir)
  rows = scorer.float_rows()
  # Every QAT run starts the shared training iterator at the same place: the same batches in
  # the same order for every recipe, whichever ran before it.
  data = scorer.problem.task.train_data
  data_start = data.get_state()
  for cfg in recipes:
    ranges = scorer.ranges(cfg)  # calibrated once, for PTQ and QAT alike
    rows.append(scorer.ptq_row(cfg, ranges))
    data.set_state(data_start)
    rows.append(_qat_row(config, train, scorer, cfg, ranges))
  return scorer_lib.write_report(scorer, rows, recipes, started, 'Quantization-aware training',
                                 distill=config.qat.distill)


def _qat_row(config, train: TrainConfig, scorer: scorer_lib.Scorer, cfg, ranges):
  """Trains the recipe's QAT run in <workdir>/qat-<recipe>/, then scores its integers."""
  task = qat_task.qat_task(config, scorer.source, scorer.problem, cfg, ranges)
  subdir = os.path.join(scorer.workdir, f'qat-{cfg.name}')
  report.say(f'QAT {cfg.name} in {subdir}.')
  loop.train(train, subdir, task)
  # The trained tree as stored (weights, and learned scales under LSQ), not its fake-quantized
  # view: the integers are rounded from it once more, exactly as in training.
  _, tree = trained.load_params(train, subdir, dataclasses.replace(task, params_transform=None))
  params, learned = transform.split(tree)
  quantized = transform.quantize(params, cfg, ranges, learned)
  return scorer.row(f'{cfg.name} QAT', os.path.join(f'qat-{cfg.name}', 'quantized'),
                    scorer.source.graphdef, quantized, cfg)

"""Stage `qat`: quantization-aware training from a finished run, beside PTQ of the same run.

Chain: the source (as in the `ptq` stage) -> for every recipe in `config.variants`: the PTQ
row, then a QAT run in <workdir>/qat-<recipe>/ that starts at the source's weights and trains
through fake-quantized weights (and activations, if the recipe quantizes them) with
straight-through gradients; scales follow the weights or are learned (LSQ,
`quant.scale=learned`); with `qat.distill`, the loss is the distillation objective against
the float source's logits, the usual recipe for low-bit recovery -> the best QAT checkpoint
rounded to integers, written to <workdir>/qat-<recipe>/quantized/ and scored beside float32,
bfloat16 and PTQ -> report.md / .json.

The QAT runs go through the spine's loop (checkpoints, resumption, early stopping on the
fake-quantized model's validation metric); the float source is never modified.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import ml_collections
from flax import nnx

from llmopt_jax import optim, stages, workdir as workdir_lib
from llmopt_jax.distill import objective
from llmopt_jax.quant import transform
from llmopt_jax.stages import quantize
from llmopt_jax.train import loop, trained


@dataclasses.dataclass(frozen=True)
class _AsStudent:
  """The distillation objective reads the trained model as `.student` (a DistillStudent's
  field); QAT distils the logits of a model into its own quantized self, no projections."""
  student: nnx.Module


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  workdir_lib.prepare(workdir, config)
  started = time.perf_counter()
  recipes = quantize.recipes(config, 'variants')  # bad fields fail before any training
  _check_distill(config)
  optim.make_optimizer(config.optim, config.train.num_steps)
  scorer = quantize.scorer(config, workdir)
  rows = scorer.float_rows()
  # Every QAT run starts the shared training iterator at the same place: the same batches in
  # the same order for every recipe, whichever ran before it.
  data_start = scorer.problem.student_task.train_data.get_state()
  for cfg in recipes:
    ranges = scorer.ranges(cfg)  # calibrated once, for PTQ and QAT alike
    rows.append(scorer.ptq_row(cfg, ranges))
    scorer.problem.student_task.train_data.set_state(data_start)
    rows.append(_qat_row(scorer, cfg, ranges))
  report = quantize.report(scorer, rows, recipes, started, distill=config.qat.distill)
  quantize.write_report(workdir, report, scorer.problem, 'Quantization-aware training')
  return report


def _qat_row(scorer: quantize.Scorer, cfg, ranges) -> dict[str, Any]:
  """Trains the recipe's QAT run in <workdir>/qat-<recipe>/, then scores its integers."""
  config, source = scorer.config, scorer.source
  task = qat_task(config, source, scorer.problem, cfg, ranges)
  subdir = f'qat-{cfg.name}'
  stages.log(f'QAT {cfg.name} in {os.path.join(scorer.workdir, subdir)}.')
  loop.train(config, os.path.join(scorer.workdir, subdir), task)
  # The trained tree as stored (weights, and learned scales under LSQ), not its fake-quantized
  # view: the integers are rounded from it once more, exactly as in training.
  _, tree = trained.load_params(config, os.path.join(scorer.workdir, subdir),
                                dataclasses.replace(task, params_transform=None))
  params, learned = transform.split(tree)
  quantized = transform.quantize(params, cfg, ranges, learned)
  return scorer.row(f'{cfg.name} QAT', os.path.join(subdir, 'quantized'), source.graphdef,
                    quantized, cfg)


def _check_distill(config: ml_collections.ConfigDict) -> None:
  if not config.qat.distill:
    return
  if config.distill.hidden_weight or config.distill.attention_weight:
    raise ValueError('config.distill.hidden_weight / attention_weight: QAT distils logits only '
                     '(the quantized model is its own student, with no projections); set 0')
  if config.distill.mode != 'online':
    raise ValueError(f'config.distill.mode={config.distill.mode!r}: QAT distils online only')


def qat_task(config: ml_collections.ConfigDict, source: quantize.Source, problem, cfg,
             ranges) -> loop.Task:
  """The source's data and evaluation; its model, started at its trained weights, trained
  through the recipe's fake quantization; with `qat.distill`, taught by the float source."""
  base = problem.student_task
  loss_fn, constants = base.loss_fn, None
  if config.qat.distill:
    layers = source.model_config.num_layers
    spec = objective.DistillConfig.from_config(config.distill, config.train.num_steps, layers,
                                               layers)
    kd = objective.make_loss_fn(spec, problem.io, source.graphdef)
    loss_fn = lambda model, batch, rngs, context: kd(_AsStudent(model), batch, rngs, context)
    constants = lambda mesh, rules: source.params
  learned = cfg.scale == 'learned'
  return dataclasses.replace(
      base, build_model=source.build, loss_fn=loss_fn,
      pretrained=lambda mesh, rules: source.params,
      extend_params=(lambda params: transform.add_scales(params, cfg)) if learned else None,
      params_transform=transform.params_transform(cfg, ranges), frozen=None,
      constants=constants)

"""The `Task` of quantization-aware training: a finished model trained through its recipe's
fake quantization, started at its own weights, on its problem's data.

Weights (and activations, if the recipe quantizes them) are rounded onto the grid in every
forward pass with straight-through gradients; scales follow the weights or are learned (LSQ,
`quant.scale=learned`). With `qat.distill` the loss is the distillation objective against
the float model's logits (the usual recipe for low-bit recovery): the quantized model is its
own student, with no projections.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from llmopt_jax.distill import objective
from llmopt_jax.quant import transform
from llmopt_jax.quant.config import QuantConfig
from llmopt_jax.tasks.finished import FinishedModel
from llmopt_jax.tasks.problem import Problem
from llmopt_jax.train.task import Task


def check_distill(config: ml_collections.ConfigDict) -> None:
  """`qat.distill` distils logits online only (checked before any work)."""
  if config.qat.distill:
    objective.from_source_logits(config.distill, config.train.num_steps, 1, None, None)


def qat_task(config: ml_collections.ConfigDict, source: FinishedModel, problem: Problem,
             cfg: QuantConfig, ranges) -> Task:
  """The problem's data and evaluation; the source's model, started at its trained weights,
  trained through `cfg`'s fake quantization; with `qat.distill`, taught by the float source."""
  base = problem.task
  loss_fn, constants = base.loss_fn, None
  if config.qat.distill:
    loss_fn = objective.from_source_logits(config.distill, config.train.num_steps,
                                           source.card.model.num_layers, problem.io,
                                           source.graphdef)
    constants = lambda mesh, rules: source.params
  learned = cfg.scale == 'learned'
  return dataclasses.replace(
      base, build_model=source.card.build, loss_fn=loss_fn,
      pretrained=lambda mesh, rules: source.params,
      extend_params=(lambda params: transform.add_scales(params, cfg)) if learned else None,
      params_transform=transform.params_transform(cfg, ranges), frozen=None,
      constants=constants)

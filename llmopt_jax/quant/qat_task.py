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
from flax import nnx

from llmopt_jax.distill import objective
from llmopt_jax.quant import transform
from llmopt_jax.quant.config import QuantConfig
from llmopt_jax.tasks.finished import FinishedModel
from llmopt_jax.tasks.problem import Problem
from llmopt_jax.train.task import Task


@dataclasses.dataclass(frozen=True)
class _AsStudent:
  """The distillation objective reads the trained model as `.student` (a DistillStudent's
  field)."""
  student: nnx.Module


def check_distill(config: ml_collections.ConfigDict) -> None:
  """`qat.distill` distils logits online only."""
  if not config.qat.distill:
    return
  if config.distill.hidden_weight or config.distill.attention_weight:
    raise ValueError('config.distill.hidden_weight / attention_weight: QAT distils logits only '
                     '(the quantized model is its own student, with no projections); set 0')
  if config.distill.mode != 'online':
    raise ValueError(f'config.distill.mode={config.distill.mode!r}: QAT distils online only')


def qat_task(config: ml_collections.ConfigDict, source: FinishedModel, problem: Problem,
             cfg: QuantConfig, ranges) -> Task:
  """The problem's data and evaluation; the source's model, started at its trained weights,
  trained through `cfg`'s fake quantization; with `qat.distill`, taught by the float source."""
  base = problem.task
  loss_fn, constants = base.loss_fn, None
  if config.qat.distill:
    layers = source.card.model.num_layers
    spec = objective.DistillConfig.from_config(config.distill, config.train.num_steps, layers,
                                               layers)
    kd = objective.make_loss_fn(spec, problem.io, source.graphdef)
    loss_fn = lambda model, batch, rngs, context: kd(_AsStudent(model), batch, rngs, context)
    constants = lambda mesh, rules: source.params
  learned = cfg.scale == 'learned'
  return dataclasses.replace(
      base, build_model=source.card.build, loss_fn=loss_fn,
      pretrained=lambda mesh, rules: source.params,
      extend_params=(lambda params: transform.add_scales(params, cfg)) if learned else None,
      params_transform=transform.params_transform(cfg, ranges), frozen=None,
      constants=constants)

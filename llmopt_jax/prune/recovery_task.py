"""The `Task` of recovery: a pruned model fine-tuned on its problem, by the labels or taught by
the dense model it was pruned from.

Unstructured and n:m: the pruned weights start the run; the trained tree is
{'base': weights, 'mask': masks} (`masks.with_masks`), the masks read off the pruned weights
themselves (a target weight that is exactly zero is pruned), so nothing but the weights has to
reach the run. The optimizer wrapper (`optimizer.py`) keeps pruned weights and their moments
at zero; with a gradual schedule in the recipe, it keeps pruning as the model recovers.

Structured: the sliced, smaller model simply trains (it has no zeros to hold).

With `config.recovery_distill`, the loss is logit distillation from the dense source (the
Minitron / Sheared-LLaMA recipe: prune, then distil from the unpruned model), online.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import ml_collections
from flax import nnx

from llmopt_jax.distill import objective
from llmopt_jax.prune import masks as masks_lib
from llmopt_jax.prune import optimizer
from llmopt_jax.prune.config import PruneConfig
from llmopt_jax.prune.masks import Path, Target
from llmopt_jax.tasks.finished import FinishedModel, ModelCard
from llmopt_jax.tasks.problem import Problem
from llmopt_jax.train.task import Task


def _masks_of(params: nnx.State, chosen: Mapping[Path, Target]) -> dict[Path, jnp.ndarray]:
  flat = dict(nnx.to_flat_state(params))
  return {p: flat[p].get_value() != 0 for p in chosen}


def check(config: ml_collections.ConfigDict) -> None:
  """The recovery objective's fields, before any work."""
  if config.recovery_distill:
    objective.from_source_logits(config.distill, config.train.num_steps, 1, None, None)


def recovery_task(config: ml_collections.ConfigDict, source: FinishedModel, problem: Problem,
                  cfg: PruneConfig, pruned: nnx.State, card: ModelCard | None = None) -> Task:
  """The problem's data and evaluation; the pruned model (built by `card` when slicing made it
  smaller, else the source's) started at `pruned`."""
  loss_fn, constants = problem.task.loss_fn, None
  if config.recovery_distill:
    loss_fn = objective.from_source_logits(config.distill, config.train.num_steps,
                                           source.card.model.num_layers, problem.io,
                                           source.graphdef)
    constants = lambda mesh, rules: source.params
  task = dataclasses.replace(
      problem.task, build_model=(card or source.card).build, loss_fn=loss_fn,
      pretrained=lambda mesh, rules: pruned, frozen=None, constants=constants)
  if cfg.granularity == 'structured':
    return task
  chosen = masks_lib.targets(pruned, cfg)
  return dataclasses.replace(
      task, extend_params=lambda params: masks_lib.with_masks(params, _masks_of(params, chosen)),
      params_transform=optimizer.params_transform(cfg),
      wrap_optimizer=lambda tx: optimizer.wrap(tx, cfg, chosen))


def trained_params(tree: nnx.State) -> nnx.State:
  """The model's parameters of a trained tree: a sliced model's as they are; a masked run's
  {'base', 'mask'} masked (a straight-through run keeps dense weights under its masks)."""
  if not masks_lib.is_masked_tree(tree):
    return tree
  params, masks = masks_lib.split(tree)
  return masks_lib.apply(params, {p: m.astype(bool) for p, m in masks.items()})

"""The `Task` of recovery: a pruned model fine-tuned on its problem with its masks held.

The pruned weights start the run; the trained tree is {'base': weights, 'mask': masks}
(`masks.with_masks`), the masks read off the pruned weights themselves (a target weight that
is exactly zero is pruned), so nothing but the weights has to reach the run. The optimizer
wrapper (`optimizer.py`) keeps pruned weights and their moments at zero; with a gradual
schedule in the recipe, it keeps pruning as the model recovers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
from flax import nnx

from llmopt_jax.prune import masks as masks_lib
from llmopt_jax.prune import optimizer
from llmopt_jax.prune.config import PruneConfig
from llmopt_jax.prune.masks import Path, Target
from llmopt_jax.tasks.finished import FinishedModel
from llmopt_jax.tasks.problem import Problem
from llmopt_jax.train.task import Task


def _masks_of(params: nnx.State, chosen: Mapping[Path, Target]) -> dict[Path, jnp.ndarray]:
  flat = dict(nnx.to_flat_state(params))
  return {p: flat[p].get_value() != 0 for p in chosen}


def recovery_task(source: FinishedModel, problem: Problem, cfg: PruneConfig,
                  pruned: nnx.State) -> Task:
  """The problem's data, loss and evaluation; the source's model started at `pruned`."""
  chosen = masks_lib.targets(pruned, cfg)
  return dataclasses.replace(
      problem.task, build_model=source.card.build,
      pretrained=lambda mesh, rules: pruned,
      extend_params=lambda params: masks_lib.with_masks(params, _masks_of(params, chosen)),
      params_transform=optimizer.params_transform(cfg),
      wrap_optimizer=lambda tx: optimizer.wrap(tx, cfg, chosen),
      frozen=None, constants=None)


def trained_params(tree: nnx.State) -> nnx.State:
  """The model's parameters of a trained {'base', 'mask'} tree, masked (a straight-through
  run keeps dense weights under its masks)."""
  params, masks = masks_lib.split(tree)
  return masks_lib.apply(params, {p: m.astype(bool) for p, m in masks.items()})

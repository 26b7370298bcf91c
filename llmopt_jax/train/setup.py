"""What training, checkpoint scoring and model loading all derive from a config and a task:
the mesh, the optimizer, the model's structure, and the shapes and shardings of the state.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ml_collections
from flax import nnx
from jax.sharding import Mesh

from llmopt_jax import optim, sharding
from llmopt_jax.train import state as state_lib
from llmopt_jax.train.checkpoint import Checkpoints

if TYPE_CHECKING:
  from llmopt_jax.train.loop import Task


@dataclasses.dataclass(frozen=True)
class Setup:
  mesh: Mesh
  rules: sharding.Rules
  tx: Any
  graphdef: nnx.GraphDef
  init: Callable[[], state_lib.TrainState]
  abstract: state_lib.TrainState  # shapes and dtypes, with shardings attached
  shardings: Any

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, task: Task) -> Setup:
    mesh, rules = sharding.from_config(config.mesh)
    tx = optim.make_optimizer(config.optim, config.train.num_steps, frozen=task.frozen)
    graphdef, init = state_lib.init_fn(task.build_model, tx, config.seed, task.extend_params)
    abstract, shardings = state_lib.abstract_and_shardings(init, mesh, rules)
    return cls(mesh, rules, tx, graphdef, init, abstract, shardings)


def open_checkpoints(config: ml_collections.ConfigDict, workdir: str) -> Checkpoints:
  """The checkpoints of `workdir`, with the keep policies of `config`."""
  return Checkpoints(
      os.path.join(workdir, 'checkpoints'), keep_last=config.checkpoint.keep_last,
      keep_best=config.checkpoint.keep_best, best_metric=config.early_stopping.metric,
      best_mode=config.early_stopping.mode, async_save=config.checkpoint.async_save)

"""What training, checkpoint scoring and model loading all derive from a config and a task:
the mesh, the optimizer, the model's structure, and the shapes and shardings of the state.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from llmopt_jax import optim, sharding
from llmopt_jax.train import state as state_lib
from llmopt_jax.train.checkpoint import Checkpoints
from llmopt_jax.train.config import TrainConfig
from llmopt_jax.train.task import Task


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
  def of(cls, train: TrainConfig, task: Task) -> Setup:
    mesh, rules = sharding.from_config(train.mesh)
    tx = optim.make_optimizer(train.optim, train.num_steps, frozen=task.frozen)
    if task.wrap_optimizer is not None:
      tx = task.wrap_optimizer(tx)
    graphdef, init = state_lib.init_fn(task.build_model, tx, train.seed, task.extend_params)
    abstract, shardings = state_lib.abstract_and_shardings(init, mesh, rules)
    return cls(mesh, rules, tx, graphdef, init, abstract, shardings)


def open_checkpoints(train: TrainConfig, workdir: str) -> Checkpoints:
  """The checkpoints of `workdir`, with the keep policies of `train`."""
  return Checkpoints(
      os.path.join(workdir, 'checkpoints'), keep_last=train.checkpoint.keep_last,
      keep_best=train.checkpoint.keep_best, best_metric=train.early_stopping.metric,
      best_mode=train.early_stopping.mode, async_save=train.checkpoint.async_save)

"""Finished runs as inputs to later stages: read a workdir's config, pick its best checkpoint,
score it on held-out data, or load its model's parameters onto a mesh.

Stages chain through workdirs: a fine-tune starts from a pretrain run, a distillation reads
its teacher from a fine-tune, quantization starts from either. A later stage loads a finished
model through `llmopt_jax.tasks.finished`, which restores only the parameters
(`restore_params`); `load_params` and `evaluate_checkpoint` serve the stage that trained the
run (its own `Task` and `TrainConfig` at hand).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from llmopt_jax import metrics as metrics_lib
from llmopt_jax import sharding
from llmopt_jax.train import checksum
from llmopt_jax.train import step as step_lib
from llmopt_jax.train.checkpoint import CHECKSUMS
from llmopt_jax.train.config import TrainConfig
from llmopt_jax.train.task import Task


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was started with (its `config.json`)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir}: no config.json; not a llmopt_jax workdir')
  with open(path, encoding='utf-8') as f:
    try:
      return ml_collections.ConfigDict(json.load(f))
    except (ValueError, UnicodeDecodeError) as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from None


def read_summary(workdir: str) -> dict[str, Any] | None:
  """The `summary.json` a finished run writes, or None while it has not finished."""
  path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def best_step(workdir: str) -> int:
  """The step of the checkpoint a finished run in `workdir` reports as best (else its last).

  Early stopping's best step is only recorded at evaluations; a run that never evaluated
  reports its final step.
  """
  summary = read_summary(workdir)
  if summary is None:
    raise FileNotFoundError(f'{workdir}: no summary.json; the run there has not finished')
  step = summary.get('best_step') or summary['final_step']
  if step not in summary.get('checkpoint_steps', [step]):
    step = summary['final_step']
  return int(step)


def evaluate_checkpoint(config: TrainConfig, workdir: str, task: Task, step: int,
                        batches: Iterable[dict[str, np.ndarray]]) -> dict[str, Any]:
  """Metric sums (not yet means) of checkpoint `step` of `workdir` over `batches`.

  Used after training to score the kept best checkpoint on a held-out test split.
  """
  mesh, rules = sharding.from_config(config.mesh)
  graphdef, target = trainable_target(task, mesh, rules)
  params = restore_params(workdir, step, target)
  eval_step = step_lib.make_eval_step(graphdef, task.eval_fn,
                                      params_transform=task.params_transform)
  eval_step = step_lib.jit_eval_step(eval_step, jax.tree.map(lambda a: a.sharding, target),
                                     mesh, rules)
  return metrics_lib.total(eval_step(params, sharding.shard_batch(b, mesh, rules))
                           for b in batches)


def load_params(config: TrainConfig, workdir: str, task: Task,
                step: int | None = None) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, model parameters) of checkpoint `step` (default: the best) of `workdir`.

  The parameters are those the model runs with: LoRA adapters merged in (the task's params
  transform), placed on the mesh of `config.mesh` with the model's logical-axis shardings.
  `nnx.merge(graphdef, params)` gives the model. No optimizer is built or read.
  """
  mesh, rules = sharding.from_config(config.mesh)
  graphdef, target = trainable_target(task, mesh, rules)
  params = restore_params(workdir, best_step(workdir) if step is None else step, target)
  if task.params_transform is not None:
    params = task.params_transform(params, None)
  return graphdef, params


def trainable_target(task: Task, mesh: Mesh, rules: sharding.Rules) -> tuple[nnx.GraphDef, Any]:
  """The model's graphdef and the task's trainable tree as shapes, dtypes and shardings on
  (mesh, rules): the target `restore_params` reads a checkpoint into. Nothing is allocated."""
  def trainable():
    params = nnx.state(task.build_model(nnx.Rngs(0)), nnx.Param)
    return params if task.extend_params is None else task.extend_params(params)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))))
  return graphdef, abstract_on(jax.eval_shape(trainable), mesh, rules)


def abstract_on(abstract: Any, mesh: Mesh, rules: sharding.Rules) -> Any:
  """`abstract` (shapes and dtypes) with the shardings its logical axes get on the mesh."""
  shardings = sharding.tree_shardings(abstract, mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def restore_params(workdir: str, step: int, abstract_params: Any) -> Any:
  """The trainable tree (`state.params`) of checkpoint `step` of `workdir`, alone.

  `abstract_params` gives the tree's structure, shapes, dtypes and shardings
  (`jax.ShapeDtypeStruct` leaves with `sharding`); nothing else of the checkpoint (the
  optimizer's moments, the step) is read, and no optimizer is built. The parameters are
  verified against the checksums saved with them (`checksum.CorruptCheckpoint` if not).
  """
  path = os.path.join(os.path.abspath(workdir), 'checkpoints', str(step), 'state')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{workdir}: no checkpoint of step {step} ({path} is missing)')
  target = {'params': abstract_params}
  restore_args = jax.tree.map(
      lambda leaf: ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape,
                                        dtype=leaf.dtype), target)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  checksum.verify(restored, _saved_checksums(os.path.dirname(path)),
                  f'{os.path.dirname(path)} (the parameters)')
  return restored['params']


def _saved_checksums(step_dir: str) -> dict[str, str]:
  """The checksums saved with a step (none for a checkpoint written before they were)."""
  path = os.path.join(step_dir, 'progress', 'metadata')
  if not os.path.exists(path):
    return {}
  with open(path, encoding='utf-8') as f:
    try:
      return json.load(f).get(CHECKSUMS, {})
    except ValueError as e:
      raise ValueError(f'{path}: not valid JSON ({e}); the checkpoint is damaged') from None

"""What the pruning stage measures: each variant written, read back, and scored.

Every row is measured the same way as the quantization stages' rows: the variant's
parameters are written to <workdir>/<variant>/ (`storage.py`: sparse kernels as values plus a
bitmask), read back from there, scored on the problem's held-out batches, and timed at batch
1 and 64 on one device. "params" counts the non-zero parameters, "bytes" is the size of the
weights file, "sparsity" the share of the target kernels' weights that are zero.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmopt_jax import sharding
from llmopt_jax.prune import masks as masks_lib
from llmopt_jax.prune import oneshot, storage, structured
from llmopt_jax.prune.config import PruneConfig
from llmopt_jax.prune.masks import Path, Target
from llmopt_jax.quant.scorer import source_model_dir
from llmopt_jax.tasks import finished, scoring
from llmopt_jax.tasks import problem as problem_lib
from llmopt_jax.tasks.problem import Problem


@dataclasses.dataclass(frozen=True)
class Scorer:
  workdir: str
  source_dir: str                  # the finished run named as the source
  source: finished.FinishedModel   # its model (a distill run's: the chosen student)
  problem: Problem
  calibration: oneshot.Calibration
  mesh: Mesh
  rules: sharding.Rules

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, workdir: str, source_dir: str) -> Scorer:
    mesh, rules = sharding.from_config(config.mesh)
    source = finished.load(source_model_dir(source_dir, config.source.student), mesh, rules)
    problem = problem_lib.make(config, source, workdir)
    data = oneshot.Calibration(problem.calibration_batches(config.calibration.examples),
                               problem.forward, problem.task.loss_fn)
    return cls(workdir, source_dir, source, problem, data, mesh, rules)

  def _read_back(self, name: str, subdir: str, params: nnx.State, sparse: list[str]
                 ) -> tuple[nnx.State, int]:
    """`params` written to `subdir` (the kernels named in `sparse` compressed), then read back
    onto the mesh: (what was read, the weights file's bytes)."""
    directory = os.path.join(self.workdir, subdir)
    size = storage.save(directory, params, sparse, {'variant': name})
    loaded, _ = storage.load(directory, params)
    return jax.device_put(loaded, NamedSharding(self.mesh, PartitionSpec())), size

  def _score(self, name: str, subdir: str, graphdef: nnx.GraphDef, loaded: nnx.State,
             size: int) -> dict[str, Any]:
    row = scoring.score(name, graphdef, loaded, self.problem, self.mesh, self.rules,
                        size=(_nonzero(loaded), size))
    return dataclasses.replace(row, directory=subdir).to_json()

  def row(self, name: str, subdir: str, params: nnx.State,
          chosen: Mapping[Path, Target], **extra) -> dict[str, Any]:
    """One table row (the report's JSON record) for `params`, written to `subdir`."""
    loaded, size = self._read_back(name, subdir, params,
                                   [masks_lib.path_name(p) for p in chosen])
    zeros, total = masks_lib.counts(loaded, chosen)
    return {**self._score(name, subdir, self.source.graphdef, loaded, size),
            'sparsity': zeros / total, **extra}

  def targets(self, cfg: PruneConfig) -> dict[Path, Target]:
    return masks_lib.targets(self.source.params, cfg)

  def dense_row(self, cfg: PruneConfig) -> dict[str, Any]:
    return self.row('dense', 'dense', self.source.params, self.targets(cfg), method='dense',
                    granularity='', recovered=False)

  def one_shot(self, cfg: PruneConfig) -> tuple[nnx.State, dict[str, Any]]:
    """(pruned params, their row): the recipe applied to the source, no training."""
    pruned, _ = oneshot.prune(cfg, self.source.graphdef, self.source.params, self.calibration)
    return pruned, self.row(cfg.name, cfg.name, pruned, self.targets(cfg), **_recipe(cfg))

  def structured(self, cfg: PruneConfig
                 ) -> tuple[finished.ModelCard, nnx.GraphDef, nnx.State, dict[str, Any]]:
    """(the smaller model's card, graphdef and params, its row): whole heads and neurons
    removed by weight norm, the matrices sliced."""
    card, params = self.source.card, self.source.params
    plan = structured.plan(structured.group_scores(params, card.model),
                           structured.neuron_scores(params, card.model),
                           heads_fraction=cfg.heads_fraction,
                           neurons_fraction=cfg.neurons_fraction)
    small, sliced = structured.slice_model(params, card.model, plan)
    card = dataclasses.replace(card, model=small)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: card.build(nnx.Rngs(0))))
    return card, graphdef, sliced, self.sliced_row(cfg.name, cfg.name, graphdef, sliced, cfg,
                                                   recovered=False)

  def sliced_row(self, name: str, subdir: str, graphdef: nnx.GraphDef, params: nnx.State,
                 cfg: PruneConfig, *, recovered: bool) -> dict[str, Any]:
    """The row of a structurally pruned model; its sparsity is the share of the target
    kernels' weights that slicing removed."""
    loaded, size = self._read_back(name, subdir, params, [])
    dense = self.targets(cfg)
    kept = dict(nnx.to_flat_state(loaded))
    remaining = sum(kept[p].get_value().size for p in dense)
    total = sum(math.prod(t.shape) for t in dense.values())
    return {**self._score(name, subdir, graphdef, loaded, size),
            'sparsity': 1 - remaining / total, **_recipe(cfg), 'recovered': recovered}


def _recipe(cfg: PruneConfig) -> dict[str, Any]:
  granularity = {'nm': f'{cfg.n}:{cfg.m}',
                 'structured': f'heads {cfg.heads_fraction:g}, mlp {cfg.neurons_fraction:g}'
                 }.get(cfg.granularity, cfg.granularity)
  return {'method': cfg.method, 'granularity': granularity, 'target_sparsity':
          cfg.target_sparsity, 'recovered': False}


def recovered_fields(cfg: PruneConfig) -> dict[str, Any]:
  return {**_recipe(cfg), 'recovered': True}


def _nonzero(params: nnx.State) -> int:
  return sum(int(np.count_nonzero(np.asarray(x))) for x in jax.tree.leaves(params))

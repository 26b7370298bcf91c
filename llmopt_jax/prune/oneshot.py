"""One-shot pruning of a trained model, with or without calibration data.

  magnitude, random        from the weights alone
  taylor                   |w| x the root-mean-square of dL/dw over the calibration batches
  wanda, sparsegpt         block by block, as their papers do: each block's kernels are
                           calibrated on the inputs the blocks before it, already pruned,
                           produce, so a block compensates for what its predecessors lost.
                           Wanda scores |w| x ||x||; SparseGPT also moves the kept weights to
                           reconstruct each kernel's outputs on those inputs.

Global granularity ranks every target at once, so it scores all kernels on the dense model's
inputs in one calibration pass.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmopt_jax.prune import calibration, scores, sparsegpt
from llmopt_jax.prune import masks as masks_lib
from llmopt_jax.prune.config import PruneConfig
from llmopt_jax.prune.masks import Path, Target
from llmopt_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class Calibration:
  """What calibrated methods run the model on: batches, a forward pass, and the loss."""
  batches: list[dict[str, np.ndarray]]
  forward: Callable[[nnx.Module, dict], Any]
  loss_fn: step_lib.LossFn


def prune(cfg: PruneConfig, graphdef: nnx.GraphDef, params: nnx.State,
          data: Calibration | None = None) -> tuple[nnx.State, dict[Path, jax.Array]]:
  """(params with the pruned weights at exactly 0, {kernel path: boolean keep-mask})."""
  chosen = masks_lib.targets(params, cfg)
  if cfg.method in ('wanda', 'sparsegpt') and cfg.granularity != 'global':
    return _block_by_block(cfg, graphdef, params, chosen, _needs(data, cfg))
  kept = masks_lib.keep(_scores(cfg, graphdef, params, chosen, data), chosen, cfg)
  return masks_lib.apply(params, kept), kept


def _needs(data: Calibration | None, cfg: PruneConfig) -> Calibration:
  if data is None or not data.batches:
    raise ValueError(f'config.prune.method={cfg.method!r} needs calibration batches '
                     f'(config.calibration.examples > 0)')
  return data


def _scores(cfg: PruneConfig, graphdef: nnx.GraphDef, params: nnx.State,
            chosen: Mapping[Path, Target], data: Calibration | None) -> dict[Path, jax.Array]:
  if cfg.method == 'magnitude':
    return scores.magnitude(params, chosen)
  if cfg.method == 'random':
    return scores.random(chosen, jax.random.key(cfg.seed))
  data = _needs(data, cfg)
  if cfg.method == 'taylor':
    return scores.taylor(params, _rms_gradients(graphdef, params, data), chosen)
  stats = calibration.input_stats(graphdef, params, chosen, data.forward, data.batches)
  return scores.wanda(params, chosen, {p: s.norms for p, s in stats.items()})


def _rms_gradients(graphdef: nnx.GraphDef, params: nnx.State, data: Calibration) -> nnx.State:
  """sqrt(mean over batches of (dL/dw)^2), L the batch's mean loss: a per-weight gradient
  size that does not cancel between batches the way a summed gradient does."""
  context = step_lib.LossContext(jnp.zeros((), jnp.int32), None)

  @jax.jit
  def squared_gradient(params, batch):
    def mean_loss(params):
      loss_sum, weight, _ = data.loss_fn(nnx.merge(graphdef, params), batch, None, context)
      return loss_sum / weight
    return jax.tree.map(jnp.square, jax.grad(mean_loss)(params))

  total = None
  for batch in data.batches:
    squared = squared_gradient(params, batch)
    total = squared if total is None else jax.tree.map(jnp.add, total, squared)
  return jax.tree.map(lambda s: jnp.sqrt(s / len(data.batches)), total)


def _blocks(chosen: Mapping[Path, Target]) -> list[dict[Path, Target]]:
  """The targets grouped by transformer block, in order; targets outside any block last."""
  by_block: dict[int, dict[Path, Target]] = {}
  for path, target in chosen.items():
    match = re.search(r'(?:^|/)blocks/(\d+)/', masks_lib.path_name(path))
    by_block.setdefault(int(match.group(1)) if match else 1 << 30, {})[path] = target
  return [by_block[b] for b in sorted(by_block)]


def _block_by_block(cfg: PruneConfig, graphdef: nnx.GraphDef, params: nnx.State,
                    chosen: Mapping[Path, Target], data: Calibration
                    ) -> tuple[nnx.State, dict[Path, jax.Array]]:
  kept: dict[Path, jax.Array] = {}
  gram = cfg.method == 'sparsegpt'
  for block in _blocks(chosen):
    stats = calibration.input_stats(graphdef, params, block, data.forward, data.batches,
                                    gram=gram)
    if gram:
      params, block_kept = _reconstruct(cfg, params, block, stats)
    else:
      block_kept = masks_lib.keep(
          scores.wanda(params, block, {p: s.norms for p, s in stats.items()}), block, cfg)
      params = masks_lib.apply(params, block_kept)
    kept.update(block_kept)
  return params, kept


def _reconstruct(cfg: PruneConfig, params: nnx.State, block: Mapping[Path, Target],
                 stats: Mapping[Path, calibration.InputStats]
                 ) -> tuple[nnx.State, dict[Path, jax.Array]]:
  """SparseGPT on every kernel of `block`: new weights in place, and their masks."""
  pattern = ({'n': cfg.n, 'm': cfg.m} if cfg.granularity == 'nm'
             else {'sparsity': cfg.sparsity})
  kept, out = {}, []
  for parts, var in nnx.to_flat_state(params):
    target = block.get(tuple(parts))
    if target is not None:
      w = var.get_value()
      new, keep = sparsegpt.prune(
          target.as_matrix(w).astype(jnp.float32), jnp.asarray(stats[tuple(parts)].hessian,
                                                              jnp.float32),
          block_size=cfg.sparsegpt_block, damp=cfg.sparsegpt_damp, **pattern)
      kept[tuple(parts)] = keep.reshape(target.shape)
      var = var.replace(jax.device_put(new.reshape(target.shape).astype(w.dtype), w.sharding))
    out.append((parts, var))
  return nnx.from_flat_state(out), kept

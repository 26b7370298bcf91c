"""Iterative magnitude pruning with weight rewinding (Frankle & Carbin 2019; Chen et al. 2020
for pretrained transformers): train, prune a share of the survivors, rewind, repeat.

Round r of R prunes to s_r = 1 - (1 - s)^(r / R), the same share of the weights still alive
in every round, and ends at s. Between rounds, the masks come from the magnitudes of the
weights the round trained (pruned weights are exactly zero there, so they rank lowest and stay
pruned: each round's masks are a subset of the last's), and the survivors restart from the
rewind point, the source's own values: the "ticket" is the mask, not the trained values.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx

from llmopt_jax.prune import masks as masks_lib, scores
from llmopt_jax.prune.config import PruneConfig
from llmopt_jax.prune.masks import Path, Target


def round_sparsity(cfg: PruneConfig, round_index: int) -> float:
  """s_r for round `round_index` (1-based) of `cfg.rounds`."""
  return 1.0 - (1.0 - cfg.sparsity) ** (round_index / cfg.rounds)


def rewind(rewind_to: nnx.State, trained: nnx.State, chosen: Mapping[Path, Target],
           cfg: PruneConfig, sparsity: float) -> tuple[nnx.State, dict[Path, jax.Array]]:
  """(the rewind point's weights under the new masks, the masks): the lowest magnitudes of
  `trained` pruned to `sparsity`, every survivor back at its value in `rewind_to`."""
  kept = masks_lib.keep(scores.magnitude(trained, chosen), chosen, cfg, sparsity)
  return masks_lib.apply(rewind_to, kept), kept

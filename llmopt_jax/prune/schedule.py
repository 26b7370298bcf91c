"""When masks change, and to which sparsity: a small function of the step.

Gradual pruning (Zhu & Gupta 2017, "To prune, or not to prune") raises the sparsity from s_i
at step t0 to s_f at step t1, recomputing the masks every dt steps:

    s(t) = s_f + (s_i - s_f) * (1 - (t' - t0) / (t1 - t0))^3,    t' = t0 + dt * floor((t - t0) / dt)

fast at first, while many redundant weights remain, then slowly as the network has fewer to
spare. Before t0 nothing is pruned; from t1 on the sparsity stays s_f. The masks are also
recomputed at t1 itself, so the final sparsity is reached even when dt does not divide
t1 - t0. `t` counts the optimizer updates applied before the current one (the train state's
step), so the step that applies update t + 1 prunes to s(t).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from llmopt_jax.prune.config import PruneConfig


@dataclasses.dataclass(frozen=True)
class Gradual:
  initial: float
  final: float
  start: int
  end: int
  every: int

  @classmethod
  def of(cls, cfg: PruneConfig) -> Gradual:
    return cls(cfg.initial_sparsity, cfg.sparsity, cfg.start_step, cfg.end_step,
               cfg.every_steps)

  def sparsity(self, step):
    """s(step), for an int or a traced int32 step; 0 before `start`."""
    step = jnp.asarray(step, jnp.int32)
    held = self.start + self.every * ((step - self.start) // self.every)  # t'
    progress = jnp.clip((held - self.start) / (self.end - self.start), 0.0, 1.0)
    progress = jnp.where(step >= self.end, 1.0, progress)
    value = self.final + (self.initial - self.final) * (1.0 - progress) ** 3
    return jnp.where(step < self.start, 0.0, value).astype(jnp.float32)

  def updates_at(self, step):
    """Whether the masks are recomputed at `step`."""
    step = jnp.asarray(step, jnp.int32)
    on_grid = (step - self.start) % self.every == 0
    return (step >= self.start) & (step <= self.end) & (on_grid | (step == self.end))

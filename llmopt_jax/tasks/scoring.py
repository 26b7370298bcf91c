"""One row of a comparison table: a model variant's quality, size and latency.

Every variant (a teacher, a student, a quantized copy) is measured the same way: the eval
step over the problem's held-out batches gives the quality; parameters and bytes come from
its arrays (or from the caller, where a file on disk is the honest size); latency is a
jitted forward pass per query at batch 1 and 64 on one device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from llmopt_jax import compare, report, sharding
from llmopt_jax import metrics as metrics_lib
from llmopt_jax.tasks.problem import Problem
from llmopt_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class VariantRow:
  model: str                     # the variant's name in the table
  params: int
  bytes: int
  quality: dict[str, float]      # the problem's quality columns
  latency_ms: dict[int, float]   # batch size -> milliseconds per query
  directory: str | None = None   # where its weights were written, relative to the workdir

  def to_json(self) -> dict[str, Any]:
    """The flat record report.json holds: model, params, bytes, each quality column,
    latency_ms_b1 and latency_ms_b64 (and directory, when there is one)."""
    row = {'model': self.model, 'params': self.params, 'bytes': self.bytes, **self.quality,
           **{f'latency_ms_b{b}': ms for b, ms in self.latency_ms.items()}}
    return row if self.directory is None else {**row, 'directory': self.directory}


def score(name: str, graphdef: nnx.GraphDef, params: nnx.State, problem: Problem, mesh: Mesh,
          rules: sharding.Rules, size: tuple[int, int] | None = None) -> VariantRow:
  """`name`'s row; `size` = (parameters, bytes) where the caller knows better than the arrays
  (quantized weights are sized from their files)."""
  eval_step = step_lib.jit_eval_step(
      step_lib.make_eval_step(graphdef, problem.eval_fn),
      jax.tree.map(lambda x: x.sharding, params), mesh, rules)
  sums = metrics_lib.total(eval_step(params, sharding.shard_batch(b, mesh, rules))
                           for b in problem.score_batches)
  count, nbytes = size or compare.size_of(params)
  latency = compare.latency_per_query(graphdef, params, problem.forward, problem.make_batch)
  row = VariantRow(name, count, nbytes, problem.quality(sums),
                   {b: 1e3 * s for b, s in latency.items()})
  report.say(f'{name}: ' + ', '.join(
      f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
      for k, v in row.to_json().items() if k != 'model'))
  return row


def table_columns(quality_columns: tuple[str, ...]) -> list[report.Column]:
  """The comparison table of `VariantRow.to_json` rows: size, quality, latency."""
  return [report.field('model', 'model'), report.field('params', 'params', ','),
          report.Column('MiB', lambda r: f'{r["bytes"] / 2**20:.1f}'),
          *(report.field(c, c, '.4f') for c in quality_columns),
          report.field('ms/query (b=1)', 'latency_ms_b1', '.2f'),
          report.field('ms/query (b=64)', 'latency_ms_b64', '.3f')]

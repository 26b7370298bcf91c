"""What the quantization stages (`ptq`, `qat`) share: the float model they start from, and
one report row per variant.

The source is a finished run: a fine-tune (classification), a pretrain (lm), or a student of
a distill run (`config.source.student`), loaded by its own model card (`tasks/finished.py`).
Every row is measured the same way: the variant's parameters are written to
<workdir>/<variant>/ (storage.py: integers packed as stored, float arrays as they are), read
back from there, scored on the same held-out batches, and timed at batch 1 and 64 on one
device; "bytes" is the size of the weights file on disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmopt_jax import compare, report, sharding
from llmopt_jax.quant import calibration, checkpoint, transform
from llmopt_jax.quant.config import QuantConfig
from llmopt_jax.tasks import finished, problem as problem_lib, scoring
from llmopt_jax.tasks.problem import Problem
from llmopt_jax.train import trained

STUDENTS = ('student_kd', 'student_labels')


def source_model_dir(source_dir: str, student: str) -> str:
  """The directory of the model to quantize: `source_dir` itself, or for a distill run its
  student `student`."""
  if trained.read_config(source_dir).get('stage') != 'distill':
    return source_dir
  subdir = os.path.join(source_dir, student)
  if student not in STUDENTS or not os.path.isdir(subdir):
    raise ValueError(f'config.source.student={student!r}: {source_dir} has no such student; '
                     f'choose from {STUDENTS}')
  return subdir


@dataclasses.dataclass(frozen=True)
class Scorer:
  """Writes each variant under `workdir`, reads it back, and scores what was read."""
  workdir: str
  source_dir: str                  # the finished run named as the source
  source: finished.FinishedModel   # its model (a distill run's: the chosen student)
  problem: Problem
  calibration_examples: int
  mesh: Mesh
  rules: sharding.Rules

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, workdir: str, source_dir: str) -> Scorer:
    """The float source of the finished run in `source_dir`, and its problem."""
    mesh, rules = sharding.from_config(config.mesh)
    source = finished.load(source_model_dir(source_dir, config.source.student), mesh, rules)
    return cls(workdir, source_dir, source, problem_lib.make(config, source, workdir),
               config.calibration.examples, mesh, rules)

  def row(self, name: str, subdir: str, graphdef: nnx.GraphDef, params: nnx.State,
          cfg: QuantConfig | None = None) -> scoring.VariantRow:
    """One row of the table; its bytes are the size of the file written in `subdir`."""
    directory = os.path.join(self.workdir, subdir)
    size = checkpoint.save(directory, params, cfg, {'variant': name})
    loaded, _, _ = checkpoint.load(directory, self.source.params)
    loaded = jax.device_put(loaded, NamedSharding(self.mesh, PartitionSpec()))
    count = compare.size_of(self.source.params)[0]
    row = scoring.score(name, graphdef, loaded, self.problem, self.mesh, self.rules,
                        size=(count, size))
    return dataclasses.replace(row, directory=subdir)

  def float_rows(self) -> list[scoring.VariantRow]:
    """float32 (the source as trained) and bfloat16 (weights and compute)."""
    source = self.source
    bf16 = jax.tree.map(lambda x: x.astype('bfloat16'), source.params)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: source.card.build(nnx.Rngs(0), 'bfloat16')))
    return [self.row('float32', 'float32', source.graphdef, source.params),
            self.row('bfloat16', 'bfloat16', graphdef, bf16)]

  def ranges(self, cfg: QuantConfig):
    """Static activations' calibrated ranges (None for weight-only or dynamic recipes)."""
    if cfg.activations != 'static':
      return None
    batches = self.problem.calibration_batches(self.calibration_examples)
    return calibration.activation_ranges(self.source.graphdef, self.source.params, cfg,
                                         self.problem.forward, batches)

  def ptq_row(self, cfg: QuantConfig, ranges=None) -> scoring.VariantRow:
    """The recipe applied to the source as it is; `ranges`: `self.ranges(cfg)`."""
    quantized = transform.quantize(self.source.params, cfg, ranges)
    return self.row(f'{cfg.name} PTQ', f'ptq-{cfg.name}', self.source.graphdef, quantized, cfg)


def write_report(scorer: Scorer, rows: list[scoring.VariantRow], recipes: list[QuantConfig],
                 started: float, title: str, **extra) -> dict[str, Any]:
  """report.json (the rows, the source, the recipe fields every variant shares) and
  report.md (the table, with each variant's size against float32); returns the record."""
  shared = {k: v for k, v in dataclasses.asdict(recipes[0]).items()
            if k not in ('bits', 'granularity')}
  record = {'rows': [r.to_json() for r in rows], 'source': scorer.source_dir,
            'recipe': shared, 'wall_time_s': time.perf_counter() - started, **extra}
  float_bytes = rows[0].bytes
  quality = scorer.problem.quality_columns
  columns = [report.field('variant', 'model'), *(report.field(c, c, '.4f') for c in quality),
             report.Column('weight MiB (file)', lambda r: f'{r["bytes"] / 2**20:.1f}'),
             report.Column('vs float32', lambda r: f'{float_bytes / r["bytes"]:.2f}x'),
             report.field('ms/query (b=1)', 'latency_ms_b1', '.2f'),
             report.field('ms/query (b=64)', 'latency_ms_b64', '.3f')]
  report.write(scorer.workdir, record, record['rows'], columns,
               title=f'{title}: {scorer.problem.description}', notes=[
                   f'Source {record["source"]}; recipe {json.dumps(shared)}.\n'
                   f'Weight bytes are the sizes of each variant\'s model.safetensors; latency '
                   f'is a jitted forward pass on one {jax.devices()[0].platform.upper()} '
                   f'device, best of 10. Wall time {record["wall_time_s"] / 60:.1f} min.'])
  return record

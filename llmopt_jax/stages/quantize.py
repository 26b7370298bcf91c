"""What the quantization stages (`ptq`, `qat`) share: the float model they start from, the
recipes they run, and one report row per variant.

The source is a finished run: a Banking77 fine-tune (classification), a pretrain (lm), or a
student of a distill run (`source.student`). Left empty, a fine-tune (or pretrain) with
`source.config` is trained first in <workdir>/source, as the distill stage does its teacher.

Every row is measured the same way: the variant's parameters are written to
<workdir>/<variant>/ (storage.py: integers packed as stored, float arrays as they are), read
back from there, scored on the same held-out batches, and timed at batch 1 and 64 on one
device; "bytes" is the size of the weights file on disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llmopt_jax import compare, sharding, stages
from llmopt_jax.hf.load import build
from llmopt_jax.quant import calibration, checkpoint, transform
from llmopt_jax.quant import config as quant_config
from llmopt_jax.stages import distill, distill_tasks
from llmopt_jax.train import trained

_VARIANT = re.compile(r'int(4|8)(?:-(channel|group|tensor))?')
_GRANULARITY = {None: 'per_channel', 'channel': 'per_channel', 'group': 'per_group',
                'tensor': 'per_tensor'}


@dataclasses.dataclass(frozen=True)
class Source:
  workdir: str
  graphdef: nnx.GraphDef
  params: nnx.State           # float, on the mesh
  model_config: Any           # TransformerConfig of the backbone
  head: Any                   # HeadConfig, or None for a language model

  def build(self, rngs: nnx.Rngs, dtype: str | None = None) -> nnx.Module:
    c = self.model_config
    c = c if dtype is None else c.replace(dtype=dtype, param_dtype=dtype)
    return build(c, self.head, rngs)


def recipes(config: ml_collections.ConfigDict, field: str) -> list[quant_config.QuantConfig]:
  """The recipes named in `config.<field>` ('int8', 'int4-group', 'int8-tensor', ...), each
  `config.quant` with that bit width and granularity. Fails on the first bad name or field."""
  names = config[field]
  names = (names,) if isinstance(names, str) else tuple(names)
  out = []
  for name in names:
    match = _VARIANT.fullmatch(name)
    if not match:
      raise ValueError(f'config.{field}: {name!r} is not a variant; write int8 or int4, '
                       f'optionally with -channel (default), -group or -tensor')
    out.append(quant_config.from_config(
        config.quant, bits=int(match.group(1)), granularity=_GRANULARITY[match.group(2)]))
  return out


def load_source(config: ml_collections.ConfigDict, source_dir: str, problem) -> Source:
  """The float model of `source_dir` (a fine-tune, pretrain, or distill run's student)."""
  source_config = trained.read_config(source_dir)
  if source_config.stage == 'distill':
    graphdef, params, model_config, head = distill.load_student(
        source_dir, config.source.student)
  else:
    source_config.mesh = config.mesh
    task = problem.teacher_task(source_config, source_dir)
    graphdef, params = trained.load_params(source_config, source_dir, task)
    model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    model_config, head = model.config, getattr(model, 'head', None)
  return Source(source_dir, graphdef, params, model_config, head)


@dataclasses.dataclass(frozen=True)
class Scorer:
  """Writes each variant under `workdir`, reads it back, and scores what was read."""
  workdir: str
  source: Source
  problem: Any            # distill_tasks.Problem: held-out batches, quality, latency inputs
  config: ml_collections.ConfigDict
  mesh: Any
  rules: Any

  def row(self, name: str, subdir: str, graphdef: nnx.GraphDef, params: nnx.State,
          cfg: quant_config.QuantConfig | None = None) -> dict[str, Any]:
    """One row of the table; its bytes are the size of the file written in `subdir`."""
    directory = os.path.join(self.workdir, subdir)
    size = checkpoint.save(directory, params, cfg, {'variant': name})
    loaded, _, _ = checkpoint.load(directory, self.source.params)
    loaded = jax.device_put(loaded, NamedSharding(self.mesh, PartitionSpec()))
    count = compare.size_of(self.source.params)[0]
    out = distill.variant_row(name, graphdef, loaded, self.problem, self.config, self.mesh,
                              self.rules, size=(count, size))
    return {**out, 'directory': subdir}

  def float_rows(self) -> list[dict[str, Any]]:
    """float32 (the source as trained) and bfloat16 (weights and compute)."""
    source = self.source
    bf16 = jax.tree.map(lambda x: x.astype('bfloat16'), source.params)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: source.build(nnx.Rngs(0), 'bfloat16')))
    return [self.row('float32', 'float32', source.graphdef, source.params),
            self.row('bfloat16', 'bfloat16', graphdef, bf16)]

  def ranges(self, cfg: quant_config.QuantConfig):
    """Static activations' calibrated ranges (None for weight-only or dynamic recipes)."""
    if cfg.activations != 'static':
      return None
    batches = self.problem.calibration_batches(self.config.calibration.examples)
    return calibration.activation_ranges(self.source.graphdef, self.source.params, cfg,
                                         self.problem.forward, batches)

  def ptq_row(self, cfg: quant_config.QuantConfig, ranges=None) -> dict[str, Any]:
    """The recipe applied to the source as it is; `ranges`: `self.ranges(cfg)`."""
    quantized = transform.quantize(self.source.params, cfg, ranges)
    return self.row(f'{cfg.name} PTQ', f'ptq-{cfg.name}', self.source.graphdef, quantized, cfg)


def scorer(config: ml_collections.ConfigDict, workdir: str) -> Scorer:
  """The source (trained first if need be) and everything needed to score its variants."""
  source_dir = stages.finished_run(config.source.workdir, 'config.source.workdir',
                                   os.path.join(workdir, 'source'), config.source.config,
                                   config.task)
  problem = distill_tasks.make(config, source_dir)
  mesh, rules = sharding.from_config(config.mesh)
  source = load_source(config, source_dir, problem)
  return Scorer(workdir, source, problem, config, mesh, rules)


def report(scorer: Scorer, rows: list[dict], recipes: list[quant_config.QuantConfig],
           started: float, **extra) -> dict[str, Any]:
  """report.json's content: the rows, the source, the recipe fields every variant shares."""
  shared = {k: v for k, v in dataclasses.asdict(recipes[0]).items()
            if k not in ('bits', 'granularity')}
  return {'rows': rows, 'source': scorer.source.workdir, 'recipe': shared,
          'wall_time_s': time.perf_counter() - started, **extra}


def write_report(workdir: str, report: dict[str, Any], problem, title: str) -> None:
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, 'report.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2)
  float_bytes = report['rows'][0]['bytes']
  headers = ['variant', *problem.quality_columns, 'weight MiB (file)', 'vs float32',
             'ms/query (b=1)', 'ms/query (b=64)']
  table = compare.markdown_table(headers, [
      [r['model'], *(f'{r[c]:.4f}' for c in problem.quality_columns),
       f'{r["bytes"] / 2**20:.1f}', f'{float_bytes / r["bytes"]:.2f}x',
       f'{r["latency_ms_b1"]:.2f}', f'{r["latency_ms_b64"]:.3f}'] for r in report['rows']])
  text = (f'# {title}: {problem.description}\n\n{table}\n'
          f'Source {report["source"]}; recipe {json.dumps(report["recipe"])}.\n'
          f'Weight bytes are the sizes of each variant\'s model.safetensors; latency is a '
          f'jitted forward pass on one {jax.devices()[0].platform.upper()} device, best of '
          f'10. Wall time {report["wall_time_s"] / 60:.1f} min.\n')
  with open(os.path.join(workdir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write(text)
  print('\n' + table + f'Report in {workdir}/report.md', flush=True)

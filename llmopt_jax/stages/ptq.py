"""Stage `ptq`: post-training quantization of a finished run, and what it costs and buys.

Chain: the source (a fine-tune, pretrain or distilled student; trained first in
<workdir>/source if not given) -> for every recipe in `config.variants`: static activation
ranges from `config.calibration.examples` training examples when the recipe asks for them,
weights rounded to the grid, integers + scales written to <workdir>/ptq-<recipe>/ -> each
variant read back from its files and scored beside float32 and bfloat16 -> report.md / .json.
Nothing trains, so a rerun repeats the (cheap) quantization and rewrites the report.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import ml_collections

from llmopt_jax import sharding, workdir as workdir_lib
from llmopt_jax.stages import distill_tasks, quantize


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  workdir_lib.prepare(workdir, config)
  started = time.perf_counter()
  recipes = quantize.recipes(config, 'variants')  # a bad field fails before any training
  source_dir = quantize.ensure_source(config, workdir)
  problem = distill_tasks.make(config, source_dir)
  mesh, rules = sharding.from_config(config.mesh)
  source = quantize.load_source(config, source_dir, problem)
  rows = quantize.float_rows(source, problem, config, mesh, rules, workdir)
  for cfg in recipes:
    rows.append(quantize.ptq_row(source, problem, cfg, config, mesh, rules, workdir))
  report = {'rows': rows, 'source': source_dir, 'wall_time_s': time.perf_counter() - started,
            'recipe': {k: v for k, v in dataclasses.asdict(recipes[0]).items()
                       if k not in ('bits', 'granularity')}}
  quantize.write_report(workdir, report, problem, 'Post-training quantization')
  return report

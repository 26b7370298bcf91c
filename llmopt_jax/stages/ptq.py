"""Stage `ptq`: post-training quantization of a finished run, and what it costs and buys.

Chain: the source (a fine-tune, pretrain or distilled student; trained first in
<workdir>/source if not given) -> for every recipe in `config.variants`: static activation
ranges from `config.calibration.examples` training examples when the recipe asks for them,
weights rounded to the grid, integers + scales written to <workdir>/ptq-<recipe>/ -> each
variant read back from its files and scored beside float32 and bfloat16 -> report.md / .json.
Nothing trains, so a rerun repeats the (cheap) quantization and rewrites the report.
"""

from __future__ import annotations

import time
from typing import Any

import ml_collections

from llmopt_jax import workdir as workdir_lib
from llmopt_jax.stages import quantize


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  workdir_lib.prepare(workdir, config)
  started = time.perf_counter()
  recipes = quantize.recipes(config, 'variants')  # a bad field fails before any training
  scorer = quantize.scorer(config, workdir)
  rows = scorer.float_rows() + [scorer.ptq_row(cfg, scorer.ranges(cfg)) for cfg in recipes]
  report = quantize.report(scorer, rows, recipes, started)
  quantize.write_report(workdir, report, scorer.problem, 'Post-training quantization')
  return report

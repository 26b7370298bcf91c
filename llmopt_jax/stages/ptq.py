"""Stage `ptq`: post-training quantization of a finished run, and what it costs and buys.

Chain: the source (a fine-tune, pretrain or distilled student; trained first in
<workdir>/source if not given) -> for every recipe in `config.variants`: static activation
ranges from `config.calibration.examples` training examples when the recipe asks for them,
weights rounded to the grid, integers + scales written to <workdir>/ptq-<recipe>/ -> each
variant read back from its files and scored beside float32 and bfloat16 -> report.md / .json.
Nothing trains, so a rerun repeats the (cheap) quantization and rewrites the report.
Fields: configs/ptq.py and `llmopt_jax/quant/config.py` (`QuantConfig`).
"""

from __future__ import annotations

import time
from typing import Any

import ml_collections

from llmopt_jax import stages, workdir as workdir_lib
from llmopt_jax.quant import recipes as recipes_lib, scorer as scorer_lib


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  workdir_lib.prepare(workdir, config)
  started = time.perf_counter()
  recipes = recipes_lib.recipes(config, 'variants')  # a bad field fails before any training
  source_dir = stages.finished_source(config, workdir)
  scorer = scorer_lib.Scorer.of(config, workdir, source_dir)
  rows = scorer.float_rows() + [scorer.ptq_row(cfg, scorer.ranges(cfg)) for cfg in recipes]
  return scorer_lib.write_report(scorer, rows, recipes, started, 'Post-training quantization')

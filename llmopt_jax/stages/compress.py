"""Stage `compress`: structured pruning, distillation from the unpruned model, then
quantization, in one run ending with one table.

Chain: the source (a fine-tune, pretrain or distilled student; trained first in
<workdir>/source if not given) -> the dense row -> `prune.heads_fraction` of every block's
attention heads and `prune.neurons_fraction` of its MLP neurons removed by weight norm, the
matrices sliced into a smaller dense model (`prune/structured.py`) -> that model distilled from
the source's logits in <workdir>/pruned-distilled/ (the shared loop: resumable, early stopping,
best checkpoint; `prune/recovery_task.py`) -> for every recipe of `config.quant_variants` the
distilled model's weights rounded to the grid, written as integers to
<workdir>/pruned-distilled-<recipe>/ -> every row read back from its files and scored ->
report.md / .json. Pruning then distilling is Minitron's (Muralidharan et al. 2024) and
Sheared-LLaMA's (Xia et al. 2024) recipe; quantization comes last so that it rounds the weights
the model ends with.
Fields: configs/compress.py.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llmopt_jax import report, stages, workdir as workdir_lib
from llmopt_jax.prune import config as prune_config, recovery_task, scorer as scorer_lib
from llmopt_jax.quant import calibration, checkpoint, recipes as recipes_lib, transform
from llmopt_jax.quant.config import QuantConfig
from llmopt_jax.tasks import scoring
from llmopt_jax.train import loop, trained
from llmopt_jax.train.config import TrainConfig


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  cfg, recipes, train = _checked(config)  # every bad field fails before anything is written
  workdir_lib.prepare(workdir, config)
  started = time.perf_counter()
  source_dir = stages.finished_source(config, workdir)
  scorer = scorer_lib.Scorer.of(config, workdir, source_dir)
  rows = [scorer.dense_row(cfg)]
  card, _, pruned, row = scorer.structured(cfg)
  rows.append({**row, 'model': 'pruned'})
  for recipe in recipes:  # the sliced widths must suit each recipe's groups: before training
    transform.targets(pruned, recipe)
  step = 'distilled' if config.recovery_distill else 'fine-tuned'
  graphdef, params, row, summary = _recovered(config, train, scorer, cfg, pruned, card, step)
  rows.append(row)
  rows += [_quantized_row(scorer, graphdef, params, recipe, row, f'pruned+{step}+{recipe.name}',
                          f'pruned-{step}-{recipe.name}') for recipe in recipes]
  return _write_report(scorer, card, rows, recipes, summary, started)


def _checked(config: ml_collections.ConfigDict
             ) -> tuple[prune_config.PruneConfig, list[QuantConfig], TrainConfig]:
  """The pruning recipe, the quantization recipes and the training fields, every one checked."""
  if config.task not in stages.FINISHED:
    raise ValueError(f'config.task={config.task!r}; choose from {sorted(stages.FINISHED)}')
  cfg = prune_config.from_config(config.prune, method='magnitude', granularity='structured')
  recipes = recipes_lib.recipes(config, 'quant_variants')
  names = [recipe.name for recipe in recipes]
  for name in names:
    if names.count(name) > 1:
      raise ValueError(f'config.quant_variants={tuple(config.quant_variants)} names the recipe '
                       f'{name} twice')
  train = TrainConfig.from_config(config)
  recovery_task.check(config)
  return cfg, recipes, train


def _recovered(config, train: TrainConfig, scorer: scorer_lib.Scorer, cfg, pruned: nnx.State,
               card, step: str) -> tuple[nnx.GraphDef, nnx.State, dict[str, Any], dict]:
  """Trains the sliced model in <workdir>/pruned-<step>/ (a finished run is only reloaded),
  then writes and scores its best checkpoint: (graphdef, params, row, run summary)."""
  task = recovery_task.recovery_task(config, scorer.source, scorer.problem, cfg, pruned, card)
  name = f'pruned-{step}'
  subdir = os.path.join(scorer.workdir, name)
  report.say(f'The pruned model, {step} in {subdir}.')
  summary = loop.train(train, subdir, task)
  graphdef, params = trained.load_params(train, subdir, task)
  row = scorer.sliced_row(f'pruned+{step}', os.path.join(name, 'weights'), graphdef, params,
                          cfg, recovered=True)
  return graphdef, params, row, summary


def _quantized_row(scorer: scorer_lib.Scorer, graphdef: nnx.GraphDef, params: nnx.State,
                   recipe: QuantConfig, recovered: dict[str, Any], name: str,
                   subdir: str) -> dict[str, Any]:
  """`params` quantized by `recipe`, written to `subdir`, read back and scored. Its parameter
  count is that of the float model its integers stand for (the `recovered` row's)."""
  ranges = None
  if recipe.activations == 'static':  # ranges of the model being quantized, not the source's
    ranges = calibration.activation_ranges(graphdef, params, recipe, scorer.problem.forward,
                                           scorer.calibration.batches)
  directory = os.path.join(scorer.workdir, subdir)
  size = checkpoint.save(directory, transform.quantize(params, recipe, ranges), recipe,
                         {'variant': name})
  loaded, _, _ = checkpoint.load(directory, params)
  loaded = jax.device_put(loaded, NamedSharding(scorer.mesh, PartitionSpec()))
  row = scoring.score(name, graphdef, loaded, scorer.problem, scorer.mesh, scorer.rules,
                      size=(recovered['params'], size))
  shared = {k: recovered[k] for k in ('sparsity', 'method', 'granularity', 'recovered')}
  return {**dataclasses.replace(row, directory=subdir).to_json(), **shared,
          'quant': recipe.name}


def _write_report(scorer: scorer_lib.Scorer, card, rows: list[dict], recipes: list[QuantConfig],
                  summary: dict, started: float) -> dict[str, Any]:
  source, small = scorer.source.card.model, card.model
  shared = {} if not recipes else {k: v for k, v in dataclasses.asdict(recipes[0]).items()
                                   if k not in ('bits', 'granularity')}
  record = {'rows': rows, 'source': scorer.source_dir, 'quant_recipe': shared,
            'pruned_model': {'num_heads': small.num_heads, 'num_kv_heads': small.num_kv_heads,
                             'mlp_dim': small.mlp_dim},
            'recovery': {k: summary.get(k) for k in ('final_step', 'best_step')},
            'wall_time_s': time.perf_counter() - started}
  dense = rows[0]
  quality = scorer.problem.quality_columns
  columns = [report.field('variant', 'model'),
             report.field('target weights removed', 'sparsity', '.3f'),
             *(report.field(c, c, '.4f') for c in quality),
             report.field('non-zero params', 'params', ','),
             report.Column('weight MiB (file)', lambda r: f'{r["bytes"] / 2**20:.2f}'),
             report.Column('vs dense', lambda r: f'{dense["bytes"] / r["bytes"]:.2f}x'),
             report.field('ms/query (b=1)', 'latency_ms_b1', '.2f'),
             report.field('ms/query (b=64)', 'latency_ms_b64', '.3f')]
  quantized = (f'{", ".join(r.name for r in recipes)} of the sliced model\'s trained weights '
               f'({shared["calibration"]} calibration, activations {shared["activations"]}; '
               f'the whole recipe in report.json)') if recipes else 'none'
  note = (f'Source {scorer.source_dir}. Every block keeps {small.num_heads} of '
          f'{source.num_heads} attention heads ({small.num_kv_heads} of {source.num_kv_heads} '
          f'kv groups) and {small.mlp_dim} of {source.mlp_dim} MLP neurons; "target weights '
          f'removed" is the share of the attention and MLP matrices\' weights that slicing took '
          f'away. The sliced model trained {record["recovery"]["final_step"]} steps (best '
          f'checkpoint: step {record["recovery"]["best_step"]}). Quantized: {quantized}; those '
          f'rows count the parameters their integers stand for.\n'
          f'Bytes are each row\'s model.safetensors; latency is a jitted forward pass on one '
          f'{jax.devices()[0].platform.upper()} device, best of 10. Wall time '
          f'{record["wall_time_s"] / 60:.1f} min.')
  report.write(scorer.workdir, record, rows, columns,
               title=f'Compression: {scorer.problem.description}', notes=[note])
  return record

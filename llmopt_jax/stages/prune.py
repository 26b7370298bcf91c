"""Stage `prune`: one-shot pruning of a finished run at several sparsities, optional
recovery fine-tunes, and what each variant keeps, weighs and costs.

Chain: the source (a fine-tune, pretrain or distilled student; trained first in
<workdir>/source if not given) -> the dense row -> for every recipe of `config.variants` x
`config.sparsities` (`prune/config.py`): calibration where the method needs it, the pruned
weights written compressed to <workdir>/<recipe>/, read back and scored -> for the variants in
`config.recover`: a fine-tune of the pruned model with its masks held, in
<workdir>/<recipe>-recovered/ (the shared loop: resumable, early stopping, best checkpoint),
scored the same way; iterative variants (`-imp`): `prune.rounds` such runs, each rewound to the
source's weights under the last round's masks (`prune/imp.py`) -> report.md / .json and quality_vs_sparsity.png.
Fields: configs/prune.py and `llmopt_jax/prune/config.py` (`PruneConfig`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections

from llmopt_jax import report, stages, workdir as workdir_lib
from llmopt_jax.prune import config as prune_config, imp, recovery_task, scorer as scorer_lib
from llmopt_jax.train import loop, trained
from llmopt_jax.train.config import TrainConfig


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  recipes = prune_config.variants(config)  # every bad field fails before anything is written
  recover = _recovered_variants(config)
  trains = recover or any(cfg.schedule == 'iterative' for cfg in recipes)
  train = TrainConfig.from_config(config) if trains else None
  if trains:
    recovery_task.check(config)
  workdir_lib.prepare(workdir, config)
  started = time.perf_counter()
  source_dir = stages.finished_source(config, workdir)
  scorer = scorer_lib.Scorer.of(config, workdir, source_dir)
  rows = [scorer.dense_row(recipes[0])]
  data_start = scorer.problem.task.train_data.get_state()
  for cfg in recipes:
    card = None
    if cfg.schedule == 'iterative':
      scorer.problem.task.train_data.set_state(data_start)
      rows.append(_iterative_row(config, train, scorer, cfg, data_start))
      continue
    if cfg.granularity == 'structured':
      card, _, pruned, row = scorer.structured(cfg)
    else:
      pruned, row = scorer.one_shot(cfg)
    rows.append(row)
    if _variant(cfg) in recover:
      scorer.problem.task.train_data.set_state(data_start)  # every recovery sees the same data
      rows.append(_recovered_row(config, train, scorer, cfg, pruned, card))
  return _write_report(scorer, rows, started)


def _variant(cfg: prune_config.PruneConfig) -> str:
  granularity = f'{cfg.n}:{cfg.m}' if cfg.granularity == 'nm' else cfg.granularity
  return f'{cfg.method}-{granularity}'


def _recovered_variants(config: ml_collections.ConfigDict) -> set[str]:
  recover = set(config.recover)
  unknown = recover - set(config.variants)
  if unknown:
    raise ValueError(f'config.recover names {sorted(unknown)}, which config.variants '
                     f'{tuple(config.variants)} does not run')
  return recover


def _recovered_row(config, train: TrainConfig, scorer: scorer_lib.Scorer, cfg, pruned, card):
  """Trains the recovery run in <workdir>/<recipe>-recovered/, then scores its best
  checkpoint."""
  task = recovery_task.recovery_task(config, scorer.source, scorer.problem, cfg, pruned, card)
  name = f'{cfg.name}-recovered'
  subdir = os.path.join(scorer.workdir, name)
  report.say(f'Recovery fine-tune of {cfg.name} in {subdir}.')
  loop.train(train, subdir, task)
  graphdef, tree = trained.load_params(train, subdir,
                                       dataclasses.replace(task, params_transform=None))
  params = recovery_task.trained_params(tree)
  weights = os.path.join(name, 'weights')
  if card is not None:
    return scorer.sliced_row(name, weights, graphdef, params, cfg, recovered=True)
  return scorer.row(name, weights, params, scorer.targets(cfg),
                    **scorer_lib.recovered_fields(cfg))


def _iterative_row(config, train: TrainConfig, scorer: scorer_lib.Scorer, cfg, data_start):
  """`cfg.rounds` recovery runs, <workdir>/<recipe>-round<r>/, each started from the source's
  weights under the masks the round before it trained; the last round's best checkpoint is
  the row."""
  source = scorer.source.params
  chosen = scorer.targets(cfg)
  trained_last = source
  for r in range(1, cfg.rounds + 1):
    start, _ = imp.rewind(source, trained_last, chosen, cfg, imp.round_sparsity(cfg, r))
    task = recovery_task.recovery_task(config, scorer.source, scorer.problem, cfg, start)
    subdir = os.path.join(scorer.workdir, f'{cfg.name}-round{r}')
    report.say(f'Iterative pruning {cfg.name}, round {r} of {cfg.rounds}, in {subdir}.')
    scorer.problem.task.train_data.set_state(data_start)
    loop.train(train, subdir, task)
    _, tree = trained.load_params(train, subdir, dataclasses.replace(task, params_transform=None))
    trained_last = recovery_task.trained_params(tree)
  return scorer.row(cfg.name, os.path.join(f'{cfg.name}-round{cfg.rounds}', 'weights'),
                    trained_last, chosen, **scorer_lib.recovered_fields(cfg))


def _write_report(scorer: scorer_lib.Scorer, rows: list[dict], started: float) -> dict:
  quality = scorer.problem.quality_columns
  record = {'rows': rows, 'source': scorer.source_dir,
            'wall_time_s': time.perf_counter() - started}
  dense = rows[0]
  columns = [report.field('variant', 'model'), report.field('sparsity', 'sparsity', '.3f'),
             *(report.field(c, c, '.4f') for c in quality),
             report.field('non-zero params', 'params', ','),
             report.Column('weight MiB (file)', lambda r: f'{r["bytes"] / 2**20:.2f}'),
             report.Column('vs dense', lambda r: f'{dense["bytes"] / r["bytes"]:.2f}x'),
             report.field('ms/query (b=1)', 'latency_ms_b1', '.2f'),
             report.field('ms/query (b=64)', 'latency_ms_b64', '.3f')]
  plot = os.path.join(scorer.workdir, 'quality_vs_sparsity.png')
  report.write(scorer.workdir, record, rows, columns,
               title=f'Pruning: {scorer.problem.description}', notes=[
                   (f'Source {scorer.source_dir}. Sparsity is the zero share of the target '
                   f'kernels; bytes are each variant\'s model.safetensors (sparse kernels as '
                   f'values + bitmask). Unstructured and n:m zeros shrink the file, not the '
                   f'time: XLA on {jax.devices()[0].platform.upper()} multiplies the dense '
                   f'matrices, so latency stays the dense model\'s. Plot: '
                   f'quality_vs_sparsity.png. Wall time {record["wall_time_s"] / 60:.1f} min.')])
  report.plot(plot, _series(rows, quality[0]), x_label='sparsity of the target kernels',
              y_label=quality[0], title=f'{quality[0]} vs sparsity')
  return record


def _series(rows: list[dict], metric: str) -> dict[str, list[tuple[float, float]]]:
  """One line per method and granularity (recovered runs apart), each from the dense point."""
  series: dict[str, list[tuple[float, float]]] = {}
  dense = (0.0, rows[0][metric])
  for row in rows[1:]:
    label = f'{row["method"]}-{row["granularity"]}' + (' +recovery' if row['recovered'] else '')
    series.setdefault(label, [dense]).append((row['sparsity'], row[metric]))
  return series

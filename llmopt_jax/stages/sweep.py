"""Stage `sweep`: a hyperparameter search, or an ablation over seeds, of any other config.

Chain: `config.sweep` checked against `config.base` (`sweeps/config.py`, `sweeps/space.py`)
-> the sweep's workdir, shared by every worker (no exclusive lock) -> the Optuna study in its
database (`sweeps/study.py`) -> trials claimed one at a time, each an ordinary run of the
base config with the trial's overrides in `trials/<number>/`, through the stage registry
(`sweeps/trials.py`) -> once the study holds its budget, report.md/report.json and the plots
(`sweeps/report.py`). Start the same command in more processes, or on more machines against
the same storage, and they share the study. Fields: configs/sweep.py.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from llmopt_jax import report, stages, workdir as workdir_lib
from llmopt_jax.sweeps import config as sweep_config
from llmopt_jax.sweeps import report as sweep_report
from llmopt_jax.sweeps import study as study_lib
from llmopt_jax.sweeps import trials


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  sweep = sweep_config.SweepConfig.from_config(config)  # every bad field fails first
  workdir_lib.prepare(workdir, config, shared=True)
  study = study_lib.open_study(sweep, workdir)
  where = study_lib.shown_url(study_lib.storage_url(sweep, workdir))
  report.say(f'Study {sweep.study_name!r} in {where}: {sweep.sampler} sampler, {sweep.pruner} '
             f'pruner, {sweep.budget} trials of {len(sweep.seeds)} seed(s), {sweep.direction} '
             f'{sweep.metric}.')
  objective = trials.Objective(sweep, config.base, sweep_config.load_base(sweep.base_config),
                               workdir, stages.run)
  study_lib.optimize(study, objective, sweep, workdir)
  with study_lib.workers_lock(workdir):
    return sweep_report.write_report(workdir, study, sweep)

"""Stages a config can name in `config.stage`, each a module with `run(config, workdir)`.

Looked up by name and imported on demand, so a stage's heavy imports cost nothing to others.
Stages never import each other: a stage that builds on another's finished run (a teacher, a
source) names its workdir, or trains it first through this registry (`finished_run`).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import ml_collections

from llmopt_jax import report

STAGES = {
    'pretrain': 'llmopt_jax.stages.pretrain',
    'finetune': 'llmopt_jax.stages.finetune',
    'finetune_lm': 'llmopt_jax.stages.finetune_lm',
    'distill': 'llmopt_jax.stages.distill',
    'ptq': 'llmopt_jax.stages.ptq',
    'qat': 'llmopt_jax.stages.qat',
}


def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
  name = config.get('stage')
  if name not in STAGES:
    raise ValueError(f'config.stage={name!r}; choose from {sorted(STAGES)}')
  return importlib.import_module(STAGES[name]).run(config, workdir)


# What a finished run of each kind of task leaves in its workdir.
FINISHED = {'classification': 'report.json', 'lm': 'summary.json'}


def finished_run(given: str, field: str, default_dir: str, config: ml_collections.ConfigDict,
                 task: str) -> str:
  """The workdir of a finished run that a stage builds on (a distillation's teacher, a
  quantization's source): `given`, the value of config field `field`, checked to hold one;
  or, `given` empty, `default_dir`, after running `config` there if it has not finished
  (resumed like any run)."""
  marker = FINISHED[task]
  if given:
    if not os.path.exists(os.path.join(given, marker)):
      raise ValueError(f'{field}={given!r} holds no finished run (no {marker}); leave it '
                       f'empty to train one in {default_dir}')
    return given
  if not os.path.exists(os.path.join(default_dir, marker)):
    report.say(f'No finished run in {default_dir} yet: training it (stage {config.stage}).')
    run(config, default_dir)
  return default_dir


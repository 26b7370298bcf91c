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
from llmopt_jax.train import trained

STAGES = {
    'pretrain': 'llmopt_jax.stages.pretrain',
    'finetune': 'llmopt_jax.stages.finetune',
    'finetune_lm': 'llmopt_jax.stages.finetune_lm',
    'distill': 'llmopt_jax.stages.distill',
    'multitask': 'llmopt_jax.stages.multitask',
    'ptq': 'llmopt_jax.stages.ptq',
    'qat': 'llmopt_jax.stages.qat',
    'prune': 'llmopt_jax.stages.prune',
    'compress': 'llmopt_jax.stages.compress',
    'predict': 'llmopt_jax.stages.predict',
    'serve': 'llmopt_jax.stages.serve',
    'generate': 'llmopt_jax.stages.generate',
    'sweep': 'llmopt_jax.stages.sweep',
}


def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
  name = config.get('stage')
  if name not in STAGES:
    raise ValueError(f'config.stage={name!r}; choose from {sorted(STAGES)}')
  return importlib.import_module(STAGES[name]).run(config, workdir)


# What a finished run of each kind of task leaves in its workdir.
FINISHED = {'classification': 'report.json', 'lm': 'summary.json'}
# The kind of model each stage trains (a distill run's: its own `task`).
_KIND = {'pretrain': 'lm', 'finetune_lm': 'lm', 'finetune': 'classification'}


def finished_run(given: str, field: str, default_dir: str, config: ml_collections.ConfigDict,
                 task: str) -> str:
  """The workdir of a finished run that a stage builds on (a distillation's teacher, a
  quantization's source): `given`, the value of config field `field`, checked to hold one of
  the kind `task` needs; or, `given` empty, `default_dir`, after running `config` there if it
  has not finished (resumed like any run)."""
  if given:
    _check_finished(given, field, default_dir, task)
    return given
  if not os.path.exists(os.path.join(default_dir, FINISHED[task])):
    report.say(f'No finished run in {default_dir} yet: training it (stage {config.stage}).')
    run(config, default_dir)
  return default_dir


def finished_source(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The finished run a stage transforms (quantizes, prunes): `config.source.workdir`, or
  <workdir>/source, trained with `config.source.config` first if it has not finished."""
  return finished_run(config.source.workdir, 'config.source.workdir',
                      os.path.join(workdir, 'source'), config.source.config, config.task)


def _check_finished(workdir: str, field: str, default_dir: str, task: str) -> None:
  stage = None
  if os.path.exists(os.path.join(workdir, 'config.json')):
    try:
      own = trained.read_config(workdir)
    except ValueError as e:
      raise ValueError(f'{field}={workdir!r}: {e}') from None
    stage = own.get('stage')
    kind = own.get('task') if stage == 'distill' else _KIND.get(stage)
    if stage in STAGES and kind != task:
      noun = {'lm': 'language model', 'classification': 'classifier'}.get(kind)
      what = f'a {stage} run' + (f' of a {noun}' if noun else ', not a trained model')
      raise ValueError(f'{field}={workdir!r} is {what}; task={task} needs a finished '
                       f'{"fine-tune" if task == "classification" else "pretrain"} (or a '
                       f'distill run of that task)')
  marker = FINISHED[task]
  if not os.path.exists(os.path.join(workdir, marker)):
    state = f'its {stage} run has not ended' if stage else 'not a llmopt_jax workdir'
    raise ValueError(f'{field}={workdir!r} holds no finished run ({state}: no {marker}); '
                     f'finish it, or leave {field} empty to train one in {default_dir}')

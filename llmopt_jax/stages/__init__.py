"""Stages a config can name in `config.stage`, each a module with `run(config, workdir)`.

Looked up by name and imported on demand, so a stage's heavy imports cost nothing to others.
"""

from __future__ import annotations

import importlib
from typing import Any

import ml_collections

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

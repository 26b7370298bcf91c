"""The run directory: created on first use, holding config.json beside the checkpoints."""

from __future__ import annotations

import os

import jax
import ml_collections


def prepare(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Creates `workdir` (or reuses it to resume) and writes the config that runs in it."""
  if not workdir:
    raise ValueError('--workdir is required')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f'--workdir={workdir} is a file, not a directory')
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    path = os.path.join(workdir, 'config.json')
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)
  return workdir

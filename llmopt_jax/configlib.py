"""Helpers for the experiment configs under `configs/`.

A config file is `get_config(arg)` returning an `ml_collections.ConfigDict`. The optional
`arg` after the colon (`configs/pretrain.py:tiny,model=base`) is parsed by `parse_arg` against
the defaults a config declares, so a misspelt or mistyped argument is an error, not a no-op.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from llmopt_jax import sharding
from llmopt_jax.models import config as model_config

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def parse_arg(arg: str | Mapping[str, Any] | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'tiny,model=base' (or, from another config, {'tiny': True, 'model': 'base'}) into
  a ConfigDict typed like `defaults`.

  A bare name sets a boolean to True; `name=value` is converted to the type of the default.
  """
  parsed = ml_collections.ConfigDict(defaults)
  pairs = arg.items() if isinstance(arg, (Mapping, ml_collections.ConfigDict)) else [
      _name_and_value(item) for item in filter(None, (arg or '').split(','))]
  for name, value in pairs:
    if name not in defaults:
      raise ValueError(f'unknown config argument {name!r}; known: {sorted(defaults)}')
    parsed[name] = _typed(name, value, defaults[name])
  return parsed


def _name_and_value(item: str) -> tuple[str, str | None]:
  """'model=base' -> ('model', 'base'); a bare 'tiny' -> ('tiny', None)."""
  name, has_value, value = item.partition('=')
  return name.strip(), value if has_value else None


def _typed(name: str, value: Any, default: Any) -> Any:
  """`value` (text from the command line, None for a bare name, or a typed value from another
  config) as the type of `default`."""
  if value is None:
    if not isinstance(default, bool):
      raise ValueError(f'config argument {name!r} needs a value: {name}=...')
    return True
  if isinstance(default, bool):
    if isinstance(value, bool):
      return value
    if str(value).lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'config argument {name}={value!r} is not a boolean')
    return str(value).lower() in ('true', '1')
  try:
    return type(default)(value)
  except ValueError:
    raise ValueError(
        f'config argument {name}={value!r} is not a {type(default).__name__}') from None


def model_fields(preset: str) -> ml_collections.ConfigDict:
  """Every field of a model preset, so any of them can be overridden on the command line."""
  return ml_collections.ConfigDict(dataclasses.asdict(model_config.get_preset(preset)))


def mesh(preset: str = 'data') -> ml_collections.ConfigDict:
  """The `config.mesh` section of a preset in `sharding.MESH_PRESETS`.

  Rules are tuples of mesh axes (empty: not split) so that each one can be overridden on the
  command line: `--config.mesh.rules.mlp=tensor` or `--config.mesh.rules.embed="('fsdp',)"`;
  `=None` or `="()"` stops splitting that axis.
  """
  if preset not in sharding.MESH_PRESETS:
    raise ValueError(
        f'unknown mesh preset {preset!r}; choose from {sorted(sharding.MESH_PRESETS)}')
  shape, rules = sharding.MESH_PRESETS[preset]
  return ml_collections.ConfigDict(dict(
      shape=dict(shape),  # axis -> size, -1 = the remaining devices; a missing axis is 1
      rules=dict(rules),  # logical axis -> mesh axes
      # Multi-slice: axis -> number of TPU slices (or GPU hosts) it spans; the slices are
      # linked by the slower data-center network, so usually `data` only. {} = one slice.
      # Set it whole: --config.mesh.dcn_shape="{'data': 2}".
      dcn_shape={},
  ))


def common(seed: int = 0, mesh_preset: str = 'data') -> ml_collections.ConfigDict:
  """Sections every training stage shares: mesh, checkpoints, early stopping."""
  config = ml_collections.ConfigDict()
  config.seed = seed
  config.mesh = mesh(mesh_preset)

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 100
  config.checkpoint.keep_last = 2
  config.checkpoint.keep_best = 1   # ranked by config.early_stopping.metric and .mode
  config.checkpoint.async_save = True

  config.early_stopping = ml_collections.ConfigDict()
  config.early_stopping.metric = 'eval/loss'
  config.early_stopping.mode = 'min'
  config.early_stopping.patience = 0   # evaluations without improvement; 0 = never stop early
  config.early_stopping.min_delta = 0.0
  return config


def optimizer(lr: float, warmup_steps: int) -> ml_collections.ConfigDict:
  """AdamW defaults that suit small transformers; see llmopt_jax/optim.py."""
  return ml_collections.ConfigDict(dict(
      lr=lr,
      schedule='cosine',       # 'cosine' | 'linear' | 'constant' after the warmup
      warmup_steps=warmup_steps,
      end_lr_factor=0.1,       # the schedule ends at lr * end_lr_factor
      b1=0.9,
      b2=0.95,                 # 0.95 rather than 0.999: steadier for LMs at small batch
      eps=1e-8,
      weight_decay=0.1,
      decay_embeddings=False,  # embeddings are lookups; decaying rare rows starves them
      clip_norm=1.0,           # global-norm clipping; 0 turns it off
      # Regexes matched in full against '/'-joined parameter paths ('blocks/0/attn/q',
      # 'embedding'); matches get no update and no Adam moments. Set it whole on the command
      # line: --config.optim.freeze="('embedding', 'blocks/[01]/.*')".
      freeze=(),
      # Layer-wise lr decay for fine-tuning (ELECTRA, BEiT): block i of L learns at
      # lr * layer_decay^(L - i), embeddings at layer_decay^(L + 1), heads at lr. 1.0 = off.
      layer_decay=1.0,
  ))


def sibling(name: str, **args: Any) -> ml_collections.ConfigDict:
  """`get_config(args)` of `configs/<name>.py`, for a config built on another one (a
  distillation's student trains like a fine-tune, its teacher is one); `args` are that
  config's arguments, typed (`tiny=True, task='lm'`), checked as the command line's are."""
  path = os.path.join(_CONFIGS, f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'llmopt_configs_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(args)


def regexes(value: str | Sequence[str], field: str) -> tuple[str, ...]:
  """A config field of regular expressions as a tuple, each one checked: one pattern given as
  a string on the command line is one pattern, not characters. Errors name `field`."""
  value = (value,) if isinstance(value, str) else tuple(value)
  for pattern in value:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f'{field}: bad regular expression {pattern!r}: {e}') from None
  return value


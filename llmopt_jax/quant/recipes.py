"""The quantization recipes a config names: 'int8', 'int4-group', 'int8-tensor', ..."""

from __future__ import annotations

import re

import ml_collections

from llmopt_jax.quant import config as quant_config

_VARIANT = re.compile(r'int(4|8)(?:-(channel|group|tensor))?')
_GRANULARITY = {None: 'per_channel', 'channel': 'per_channel', 'group': 'per_group',
                'tensor': 'per_tensor'}


def recipes(config: ml_collections.ConfigDict, field: str) -> list[quant_config.QuantConfig]:
  """The recipes named in `config.<field>`, each `config.quant` with that bit width and
  granularity. Fails on the first bad name or field."""
  names = config[field]
  names = (names,) if isinstance(names, str) else tuple(names)
  out = []
  for name in names:
    match = _VARIANT.fullmatch(name)
    if not match:
      raise ValueError(f'config.{field}: {name!r} is not a variant; write int8 or int4, '
                       f'optionally with -channel (default), -group or -tensor')
    out.append(quant_config.from_config(
        config.quant, bits=int(match.group(1)), granularity=_GRANULARITY[match.group(2)]))
  return out

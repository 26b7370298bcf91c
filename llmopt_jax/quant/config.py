"""What to quantize and how: the `config.quant` section as a validated `QuantConfig`.

Every field is checked here, once, so a bad value is a one-line error naming the field
(`config.quant.bits=3; choose from (4, 8)`) before any model is loaded or trained.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from llmopt_jax import configlib

BITS = (4, 8)
GRANULARITIES = ('per_tensor', 'per_channel', 'per_group')
ACTIVATIONS = ('none', 'dynamic', 'static')
CALIBRATIONS = ('absmax', 'percentile', 'mse')
SCALES = ('weights', 'learned')

# Every matrix the model multiplies activations with, and the token embedding table (half of
# MiniLM's weights). Learned position and token-type tables are small and left in float.
DEFAULT_TARGETS = (r'.*attn/(q|k|v|o)', r'.*mlp/(gate|up|down)', r'(.*/)?lm_head',
                   r'(.*/)?embedding')
# The classifier head and BERT's pooler: a few thousand weights that every logit depends on.
DEFAULT_EXCLUDE = (r'(classifier|pooler)/.*', r'.*(position|token_type)_embed/embedding')


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """One quantization recipe; `config.quant` holds its fields under the same names."""

  bits: int = 8                      # weight bits: 8 or 4
  granularity: str = 'per_channel'   # one scale per tensor, per output channel, or per group
  group_size: int = 128              # per_group: input-dim elements sharing a scale
  symmetric: bool = True             # False: a zero point per scale (min/max range)
  calibration: str = 'absmax'        # weight (and static activation) range: absmax |
                                     # percentile | mse (the clip that minimises the error)
  percentile: float = 99.9           # calibration='percentile': of |w| per scale group
  activations: str = 'none'          # none (weight-only) | dynamic (int8 per token) |
                                     # static (int8, per-tensor range from calibration)
  scale: str = 'weights'             # QAT: scales from the current weights, or 'learned' (LSQ)
  targets: tuple[str, ...] = DEFAULT_TARGETS   # regexes, matched in full against param paths
  exclude: tuple[str, ...] = DEFAULT_EXCLUDE   # regexes that win over targets
  exclude_first_last: bool = False   # keep the first and last blocks in float too

  def __post_init__(self):
    _choice('bits', self.bits, BITS)
    _choice('granularity', self.granularity, GRANULARITIES)
    _choice('activations', self.activations, ACTIVATIONS)
    _choice('calibration', self.calibration, CALIBRATIONS)
    _choice('scale', self.scale, SCALES)
    if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or (
        self.group_size < 1):
      raise ValueError(f'config.quant.group_size={self.group_size!r}; must be a positive int')
    if not 50.0 < self.percentile <= 100.0:
      raise ValueError(f'config.quant.percentile={self.percentile!r}; must lie in (50, 100]')
    if self.scale == 'learned' and not self.symmetric:
      raise ValueError('config.quant.scale=learned supports symmetric=True only (LSQ learns '
                       'one step size; a learned zero point is not implemented)')
    for field in ('targets', 'exclude'):
      object.__setattr__(self, field, configlib.regexes(getattr(self, field),
                                                        f'config.quant.{field}'))

  @property
  def name(self) -> str:
    """A short label for tables and directories: int8, int4-g128, int8-tensor, + a8 ..."""
    detail = {'per_channel': '', 'per_tensor': '-tensor',
              'per_group': f'-g{self.group_size}'}[self.granularity]
    acts = {'none': '', 'dynamic': '-a8dyn', 'static': '-a8'}[self.activations]
    return f'int{self.bits}{detail}{acts}'


def _choice(field: str, value, allowed: tuple) -> None:
  if isinstance(value, bool) or value not in allowed:
    raise ValueError(f'config.quant.{field}={value!r}; choose from {allowed}')


def from_config(quant: ml_collections.ConfigDict, **overrides) -> QuantConfig:
  """`config.quant` (any subset of QuantConfig's fields) as a QuantConfig; `overrides` win."""
  known = {f.name for f in dataclasses.fields(QuantConfig)}
  fields = {k: v for k, v in quant.to_dict().items() if k in known}
  unknown = sorted(set(quant.to_dict()) - known)
  if unknown:
    raise ValueError(f'config.quant.{unknown[0]} is not a quantization field; known: '
                     f'{sorted(known)}')
  fields.update(overrides)
  if 'bits' in fields and not isinstance(fields['bits'], bool):
    fields['bits'] = _as_int('bits', fields['bits'])
  return QuantConfig(**fields)


def _as_int(field: str, value):
  try:
    return int(value) if float(value) == int(value) else value
  except (TypeError, ValueError):
    raise ValueError(f'config.quant.{field}={value!r}; choose from {BITS}') from None


def section(**overrides) -> ml_collections.ConfigDict:
  """The `config.quant` section with QuantConfig's defaults, for the configs to start from.

  Bit width and granularity are left out: the stages take them from each entry of
  `config.variants` ('int8', 'int4-group', ...), so one run compares several.
  """
  defaults = dataclasses.asdict(QuantConfig())
  del defaults['bits'], defaults['granularity']
  defaults.update(overrides)
  return ml_collections.ConfigDict(defaults)

"""What to prune and how: the `config.prune` section as a validated `PruneConfig`.

Every field is checked here, once, so a bad value is a one-line error naming the field
(`config.prune.sparsity=1.2; must lie in [0, 1)`) before any model is loaded or trained.

A recipe is a score (which weights matter least), a granularity (among which weights the
lowest scores are removed) and a schedule (when):

  method       magnitude |w| (Han et al. 2015), random (the baseline every method must
               beat), taylor (|w * dL/dw| accumulated over calibration batches; Molchanov et
               al. 2019), wanda (|w| x the L2 norm of its input feature over calibration
               tokens; Sun et al. 2024), sparsegpt (blocked OBS reconstruction with the
               calibration inputs' Hessian; Frantar & Alistarh 2023: the kept weights move)
  granularity  layer (each kernel loses `sparsity` of its weights), global (one threshold
               over every target kernel: layers lose different shares), output (each output
               channel of each kernel loses `sparsity`; Wanda's and SparseGPT's comparison
               group), nm (at most `n` non-zeros in every `m` consecutive inputs, 2:4 being
               what sparse tensor cores run), structured (whole attention heads, as their
               key/value groups, and MLP neurons out of every block: `heads_fraction` and
               `neurons_fraction` of them, by weight norm; the matrices are sliced into a
               smaller dense model, so it is faster everywhere: `structured.py`)
  schedule     one_shot (prune once, then optionally recover), gradual (Zhu & Gupta 2017:
               sparsity rises from `initial_sparsity` to `sparsity` as a cubic between
               `start_step` and `end_step`, the mask recomputed every `every_steps`),
               iterative (Frankle & Carbin 2019, lottery tickets with weight rewinding:
               `rounds` times train, prune the same share of the survivors by magnitude,
               rewind the survivors to the source's weights; `imp.py`)
"""

from __future__ import annotations

import dataclasses
import numbers

import ml_collections

from llmopt_jax import configlib

METHODS = ('magnitude', 'random', 'taylor', 'wanda', 'sparsegpt')
GRANULARITIES = ('layer', 'global', 'output', 'nm', 'structured')
SCHEDULES = ('one_shot', 'gradual', 'iterative')
# Methods that read calibration activations (inputs to each kernel) or gradients, and so
# cannot run inside a training step.
CALIBRATED = ('taylor', 'wanda', 'sparsegpt')
# Granularities whose counts SparseGPT's per-row reconstruction can honour.
SPARSEGPT_GRANULARITIES = ('output', 'nm')

# The matrices of attention and MLP blocks. Embedding tables, the LM head, the classifier
# and BERT's pooler are kept dense by default, as Wanda, SparseGPT and jaxpruner do: few
# weights for what every token and every logit depends on.
DEFAULT_TARGETS = (r'.*attn/(q|k|v|o)', r'.*mlp/(gate|up|down)')
DEFAULT_EXCLUDE = (r'(classifier|pooler)/.*', r'(.*/)?lm_head', r'(.*/)?embedding')


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """One pruning recipe; `config.prune` holds its fields under the same names."""

  method: str = 'magnitude'
  granularity: str = 'layer'
  sparsity: float = 0.5              # final share of each target's weights set to zero
  n: int = 2                         # granularity=nm: keep n ...
  m: int = 4                         # ... of every m consecutive input weights
  schedule: str = 'one_shot'
  initial_sparsity: float = 0.0      # gradual: the sparsity at start_step
  start_step: int = 0                # gradual: first pruning step
  end_step: int = 0                  # gradual: the step sparsity reaches `sparsity`
  every_steps: int = 1               # gradual: masks recomputed every this many steps
  rounds: int = 3                    # iterative: train-prune-rewind rounds to reach `sparsity`
  ste: bool = False                  # straight-through: masked weights keep receiving gradient
                                     # (and may grow back at the next mask update)
  heads_fraction: float = 0.0        # structured: share of attention heads (kv groups) removed
  neurons_fraction: float = 0.0      # structured: share of MLP neurons removed
  sparsegpt_block: int = 128         # sparsegpt: input columns reconstructed together
  sparsegpt_damp: float = 0.01       # sparsegpt: Hessian dampening, a share of its mean diagonal
  seed: int = 0                      # random scores
  targets: tuple[str, ...] = DEFAULT_TARGETS   # regexes, matched in full against param paths
  exclude: tuple[str, ...] = DEFAULT_EXCLUDE   # regexes that win over targets

  def __post_init__(self):
    _choice('method', self.method, METHODS)
    _choice('granularity', self.granularity, GRANULARITIES)
    _choice('schedule', self.schedule, SCHEDULES)
    _fraction('sparsity', self.sparsity)
    _fraction('initial_sparsity', self.initial_sparsity)
    _fraction('heads_fraction', self.heads_fraction)
    _fraction('neurons_fraction', self.neurons_fraction)
    for field in ('n', 'm', 'every_steps', 'sparsegpt_block', 'rounds'):
      _int(field, getattr(self, field), low=1)
    for field in ('start_step', 'end_step', 'seed'):
      _int(field, getattr(self, field), low=0)
    if self.n > self.m:
      raise ValueError(f'config.prune.n={self.n} > config.prune.m={self.m}; an n:m pattern '
                       f'keeps n of every m weights (2:4), so n <= m')
    if not 0.0 <= self.sparsegpt_damp < 1.0:
      raise ValueError(f'config.prune.sparsegpt_damp={self.sparsegpt_damp!r}; must lie in '
                       f'[0, 1)')
    if self.method == 'sparsegpt' and self.granularity not in SPARSEGPT_GRANULARITIES:
      raise ValueError(f'config.prune.granularity={self.granularity!r}: sparsegpt chooses its '
                       f'mask per output row as it reconstructs; choose from '
                       f'{SPARSEGPT_GRANULARITIES}')
    if self.granularity == 'structured':
      self._check_structured()
    if self.schedule == 'gradual':
      self._check_gradual()
    if self.schedule == 'iterative' and (self.method != 'magnitude' or self.granularity not in (
        'layer', 'global')):
      raise ValueError(f'config.prune.schedule=iterative prunes by the magnitude of trained '
                       f'weights, layer-wise or global; got method={self.method!r}, '
                       f'granularity={self.granularity!r}')
    for field in ('targets', 'exclude'):
      object.__setattr__(self, field, configlib.regexes(getattr(self, field),
                                                        f'config.prune.{field}'))

  def _check_structured(self) -> None:
    if self.method != 'magnitude':
      raise ValueError(f'config.prune.method={self.method!r}: structured pruning ranks heads '
                       f'and neurons by weight norm; use magnitude')
    if self.schedule != 'one_shot':
      raise ValueError('config.prune.schedule: structured pruning slices the matrices once; '
                       'use schedule=one_shot')
    if not (self.heads_fraction or self.neurons_fraction):
      raise ValueError('config.prune.heads_fraction and neurons_fraction are both 0: '
                       'structured pruning would remove nothing')

  def _check_gradual(self) -> None:
    if self.method in CALIBRATED and self.method != 'taylor':
      raise ValueError(f'config.prune.method={self.method!r} prunes once from calibration '
                       f'data; a gradual schedule needs magnitude, random or taylor')
    if self.granularity == 'nm':
      raise ValueError('config.prune.schedule=gradual raises the sparsity step by step; an '
                       'n:m pattern has one sparsity: use schedule=one_shot')
    if self.end_step <= self.start_step:
      raise ValueError(f'config.prune.end_step={self.end_step} must be after start_step='
                       f'{self.start_step} for a gradual schedule')
    if self.initial_sparsity > self.sparsity:
      raise ValueError(f'config.prune.initial_sparsity={self.initial_sparsity} is above '
                       f'sparsity={self.sparsity}; a gradual schedule only prunes more')

  @property
  def target_sparsity(self) -> float:
    """The share of each target's weights that ends at zero."""
    return 1.0 - self.n / self.m if self.granularity == 'nm' else self.sparsity

  @property
  def name(self) -> str:
    """A short label for tables and directories: magnitude-layer-50, wanda-2of4, ..."""
    if self.granularity == 'nm':
      return f'{self.method}-{self.n}of{self.m}'
    if self.granularity == 'structured':
      return (f'{self.method}-heads{round(100 * self.heads_fraction)}'
              f'-mlp{round(100 * self.neurons_fraction)}')
    imp = '-imp' if self.schedule == 'iterative' else ''
    return f'{self.method}-{self.granularity}{imp}-{round(100 * self.sparsity)}'


def _choice(field: str, value, allowed: tuple) -> None:
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(f'config.prune.{field}={value!r}; choose from {allowed}')


def _fraction(field: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
    raise ValueError(f'config.prune.{field}={value!r}; must lie in [0, 1)')


def _int(field: str, value, *, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
    raise ValueError(f'config.prune.{field}={value!r}; must be an int >= {low}')


def from_config(prune: ml_collections.ConfigDict, **overrides) -> PruneConfig:
  """`config.prune` (any subset of PruneConfig's fields) as a PruneConfig; `overrides` win."""
  known = {f.name for f in dataclasses.fields(PruneConfig)}
  fields = prune.to_dict()
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f'config.prune.{unknown[0]} is not a pruning field; known: '
                     f'{sorted(known)}')
  fields.update(overrides)
  return PruneConfig(**fields)


def section(**overrides) -> ml_collections.ConfigDict:
  """The `config.prune` section with PruneConfig's defaults, for the configs to start from."""
  return ml_collections.ConfigDict({**dataclasses.asdict(PruneConfig()), **overrides})


def variants(config: ml_collections.ConfigDict) -> list[PruneConfig]:
  """The recipes of one run: each entry of `config.variants`, '<method>-<granularity>'
  (magnitude-global, wanda-output) at every sparsity of `config.sparsities`, or
  '<method>-<n>:<m>' (sparsegpt-2:4) or magnitude-structured (with config.prune's
  heads_fraction and neurons_fraction) once; '<method>-<granularity>-imp' is iterative
  pruning with rewinding (magnitude-global-imp); the other fields from `config.prune`."""
  if isinstance(config.variants, str) or not config.variants:
    raise ValueError(f'config.variants={config.variants!r}; give a tuple of entries such as '
                     f"('magnitude-layer', 'wanda-2:4')")
  sparsities = tuple(config.sparsities)
  if not sparsities:
    raise ValueError('config.sparsities is empty; give at least one, e.g. (0.5,)')
  recipes = []
  for entry in config.variants:
    method, granularity = _split_variant(entry)
    schedule = {}
    if granularity.endswith('-imp'):  # magnitude-global-imp: iterative, with rewinding
      granularity, schedule = granularity[:-len('-imp')], {'schedule': 'iterative'}
    if ':' in granularity:
      n, m = _n_of_m(entry, granularity)
      recipes.append(from_config(config.prune, method=method, granularity='nm', n=n, m=m))
    elif granularity == 'structured':  # its fractions are config.prune's
      recipes.append(from_config(config.prune, method=method, granularity=granularity))
    else:
      recipes.extend(from_config(config.prune, method=method, granularity=granularity,
                                 sparsity=_as_fraction(s), **schedule) for s in sparsities)
  return recipes


def _split_variant(entry) -> tuple[str, str]:
  method, _, granularity = str(entry).partition('-')
  if not granularity:
    raise ValueError(f'config.variants entry {entry!r}: expected <method>-<granularity> (e.g. '
                     f"'magnitude-global', 'wanda-2:4'); methods {METHODS}, granularities "
                     f"{GRANULARITIES[:3]}, structured or n:m")
  return method, granularity


def _n_of_m(entry: str, granularity: str) -> tuple[int, int]:
  n, _, m = granularity.partition(':')
  if not (n.isdigit() and m.isdigit()):
    raise ValueError(f'config.variants entry {entry!r}: an n:m pattern is two ints, e.g. 2:4')
  return int(n), int(m)


def _as_fraction(value) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
    raise ValueError(f'config.sparsities entry {value!r}; must lie in [0, 1)')
  return float(value)

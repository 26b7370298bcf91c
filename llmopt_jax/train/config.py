"""`TrainConfig`: what the training loop reads of an experiment config, typed and checked once.

A stage calls `TrainConfig.from_config(config)` before any data or model work, so a bad value
(a step count of 0, an interval of 0, a negative learning rate, an unknown schedule) is a
one-line error naming its field, and then hands the record to `loop.train`; the loop never
sees the rest of the experiment config. The fields are documented where the configs set them
(`configs/pretrain.py`, `configs/finetune.py`, `llmopt_jax/configlib.py`).
"""

from __future__ import annotations

import dataclasses
import numbers

import ml_collections

from llmopt_jax.optim import OptimConfig

_MODES = ('min', 'max')


def _positive_int(field: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f'config.{field}={value!r} must be an int >= 1')


def _non_negative_int(field: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
    raise ValueError(f'config.{field}={value!r} must be an int >= 0')


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 100
  keep_last: int = 2
  keep_best: int = 1      # ranked by the early-stopping metric and mode
  async_save: bool = True

  def __post_init__(self):
    _positive_int('checkpoint.every_steps', self.every_steps)
    _positive_int('checkpoint.keep_last', self.keep_last)
    _non_negative_int('checkpoint.keep_best', self.keep_best)


@dataclasses.dataclass(frozen=True)
class EarlyStoppingConfig:
  metric: str = 'eval/loss'
  mode: str = 'min'
  patience: int = 0       # evaluations without improvement; 0 = never stop early
  min_delta: float = 0.0

  def __post_init__(self):
    if self.mode not in _MODES:
      raise ValueError(f'config.early_stopping.mode={self.mode!r}; choose from {_MODES}')
    _non_negative_int('early_stopping.patience', self.patience)
    if not self.min_delta >= 0:
      raise ValueError(f'config.early_stopping.min_delta={self.min_delta!r} must be >= 0')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  num_steps: int
  batch_size: int
  optim: OptimConfig
  mesh: ml_collections.FrozenConfigDict  # shape, rules, dcn_shape: `sharding.from_config`
  num_micro_batches: int = 1
  log_every: int = 20
  eval_every: int = 100
  seed: int = 0
  checkpoint: CheckpointConfig = CheckpointConfig()
  early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()

  def __post_init__(self):
    for field in ('num_steps', 'batch_size', 'num_micro_batches', 'log_every', 'eval_every'):
      _positive_int(f'train.{field}', getattr(self, field))
    _non_negative_int('seed', self.seed)
    if self.batch_size % self.num_micro_batches:
      raise ValueError(f'config.train.batch_size={self.batch_size} does not divide into '
                       f'config.train.num_micro_batches={self.num_micro_batches}')
    if self.optim.warmup_steps > self.num_steps:
      raise ValueError(f'config.optim.warmup_steps={self.optim.warmup_steps} must lie in '
                       f'[0, {self.num_steps}] (config.train.num_steps)')

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> TrainConfig:
    """The training fields of an experiment config (sections train, optim, mesh, checkpoint,
    early_stopping, and the seed), each checked."""
    train = config.train
    return cls(
        num_steps=train.num_steps, batch_size=train.batch_size,
        num_micro_batches=train.get('num_micro_batches', 1), log_every=train.log_every,
        eval_every=train.eval_every, seed=config.seed,
        optim=OptimConfig.from_config(config.optim),
        mesh=ml_collections.FrozenConfigDict(config.mesh),
        checkpoint=CheckpointConfig(**config.checkpoint.to_dict()),
        early_stopping=EarlyStoppingConfig(**config.early_stopping.to_dict()))

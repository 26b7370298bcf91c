"""Consistency training (UDA, Xie et al., 2019) as a term of the classification fine-tune's loss.

  config.consistency.weight = 1.0       # 0 = off (the default): the fine-tune of old
  config.consistency.source = 'rest'    # or a .txt/.csv/.tsv/.jsonl file of texts

Each step reads, beside its labelled rows, `unlabelled_batch_size` rows of unlabelled text
(`data/unlabelled.py`) in two views: the text as it is and an augmented copy. The model's
prediction on the clean view, sharpened by `temperature` and held fixed, is the target of its
prediction on the augmented one (`llmopt_jax/consistency.py`); rows whose clean prediction is
not `confidence`-sure are left out. The objective of a step is

    cross entropy over the labelled rows + weight * (KL sum over kept rows / rows kept)

(the term is 0 while no row is kept). The clean view runs without dropout: it is the target,
and a target drawn through dropout is noise on noise. The augmented view runs with dropout, as
the labelled rows do. The logged metrics are the cross entropy ('loss', comparable with a run
without the term), 'consistency' (the term as it entered the objective, per step) and
'consistency_kept' (the fraction of unlabelled rows above the confidence threshold). With
gradient accumulation each micro-batch's term is its own mean, weighted like its labelled rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from llmopt_jax import classification_metrics, consistency
from llmopt_jax.data import unlabelled
from llmopt_jax.data.augment.config import AugmentConfig
from llmopt_jax.data.unlabelled import UnlabelledConfig

FIELD = 'config.consistency'


@dataclasses.dataclass(frozen=True)
class ConsistencyConfig:
  """`config.consistency` when on, checked once, before any work."""
  weight: float
  temperature: float
  confidence: float
  stream: UnlabelledConfig  # the unlabelled rows each step reads, and their augmentation

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> ConsistencyConfig | None:
    """From the run's config; None when off (weight 0, or a config without the section)."""
    section = config.get('consistency')
    if section is None:
      return None
    weight = _number(section, 'weight', lambda x: x >= 0, '>= 0 (0 = off)')
    temperature = _number(section, 'temperature', lambda x: x > 0, '> 0 (1 = no sharpening)')
    confidence = _number(section, 'confidence', lambda x: 0 <= x <= 1, 'in [0, 1] (0 = keep '
                         'every row)')
    augment = _augment(section.get('augment', ()), config['data'].get('augment_mask', ''))
    if not weight:
      return None
    if not augment.operations:
      raise ValueError(f'{FIELD}.augment=(): consistency training needs operations to make the '
                       f"augmented view, e.g. ('synonym:0.3', 'delete:0.1')")
    stream = UnlabelledConfig.check(
        section.get('source', 'rest'), section.get('unlabelled_batch_size'), augment,
        labelled_batch=config['train']['batch_size'],
        shots=config['data'].get('shots_per_class', 0), field=f'{FIELD}.source',
        size_field=f'{FIELD}.unlabelled_batch_size')
    return cls(float(weight), float(temperature), float(confidence), stream)

  def describe(self) -> str:
    ops = ', '.join(f'{op.name} {op.rate:g}' for op in self.stream.augment.operations)
    return (f'Consistency training: weight {self.weight:g}, {self.stream.batch_size} '
            f'unlabelled rows per step from {self.stream.source!r} ({ops}), temperature '
            f'{self.temperature:g}, confidence {self.confidence:g}')


def _number(section: Mapping[str, Any], name: str, ok: Callable[[float], bool],
            allowed: str) -> float:
  value = section.get(name)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
    raise ValueError(f'{FIELD}.{name}={value!r} must be a number {allowed}')
  return value


def _augment(raw: Any, mask: str) -> AugmentConfig:
  """The augmented view's operations, checked as config.data.augment's are."""
  try:
    return AugmentConfig.from_config({'augment': raw, 'augment_mask': mask})
  except ValueError as e:  # the same checks; the message should name this section's field
    raise ValueError(str(e).replace('config.data.augment[', f'{FIELD}.augment[')) from None


Logits = Callable[..., jnp.ndarray]  # (model, batch, rngs=None) -> logits [B, C]


def make_loss_fn(cfg: ConsistencyConfig, logits: Logits, label_smoothing: float):
  """`loss_fn(model, batch, rngs, context)` for the train step: the labelled cross entropy
  plus the weighted consistency term (see the module docstring). Returns
  (objective * n, n, sums) with n the labelled rows' weight, so the step's division by n
  gives the objective."""

  def loss_fn(model, batch, rngs, context=None):
    del context
    sums = dict(classification_metrics.classification_sums(
        logits(model, batch, rngs), batch['labels'], batch['weights'],
        label_smoothing=label_smoothing, confusion=False))
    cross_entropy, n = sums['loss']
    clean = logits(model, unlabelled.view(batch, unlabelled.CLEAN))  # the target: no dropout
    augmented = logits(model, unlabelled.view(batch, unlabelled.AUGMENTED), rngs)
    rows = jnp.ones(clean.shape[:1], jnp.float32)
    kl_sum, kept = consistency.consistency_loss(
        clean, augmented, rows, temperature=cfg.temperature, confidence=cfg.confidence)
    term = jnp.where(kept > 0, kl_sum / jnp.maximum(kept, 1.0), 0.0)
    objective = cross_entropy + cfg.weight * n * term
    one = jnp.ones((), jnp.float32)
    sums.update(consistency=(term, one), consistency_kept=(kept, jnp.sum(rows)),
                objective=(objective, n))
    return objective, n, sums
  return loss_fn

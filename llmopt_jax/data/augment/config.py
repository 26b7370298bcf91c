"""Augmentation settings of `config.data`, read and checked once, before any work.

  config.data.augment = ('synonym:0.2', 'swap:0.1')   # 'operation:rate', applied in order
  config.data.augment_copies = 1                      # augmented copies per example
  config.data.augment_mask = ''                       # '' = the tokenizer's mask token

On the command line: --config.data.augment="('synonym:0.2','swap:0.1')", or one operation
alone as --config.data.augment=synonym:0.2.

Copies are added, not swapped in: an epoch holds each training example once as it is and
`augment_copies` times edited (copy k of example i is always edited from the original, never
from another copy), all with the example's label, so an epoch has (1 + copies) times as many
rows. Keeping every original means augmentation can only add signal, never hide a scarce
example (at 10 shots per class each original matters), and copies = 0 is exactly training
without augmentation. Replacing originals with probability p instead would keep the epoch
size but train on fewer clean examples.

A rewrite operation, 'paraphrase:p' or 'backtranslate:p', comes first in the list (it picks
the text the later edits start from, `pipeline.Augmenter`), at most one per list; its rate p
is the probability that a copy starts from its rewrite. It needs `config.data.rewrite`, the
generator (`rewrite_config.py`); a stage that precomputes the rewrites passes them to `build`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from llmopt_jax.data.augment import pipeline
from llmopt_jax.data.augment.rewrite_config import RewriteConfig

FIELD = 'config.data.augment'


@dataclasses.dataclass(frozen=True)
class Operation:
  name: str    # a key of pipeline.OPERATIONS
  rate: float  # probability per word or character, in [0, 1]


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  operations: tuple[Operation, ...] = ()
  copies: int = 1
  mask: str = ''  # '' = the tokenizer's own mask (or unknown) token
  generator: RewriteConfig | None = None  # config.data.rewrite, with a rewrite operation

  @property
  def enabled(self) -> bool:
    return bool(self.operations) and self.copies > 0

  @property
  def rewrite(self) -> Operation | None:
    """The rewrite operation (always first), or None."""
    first = self.operations[0] if self.operations else None
    return first if first and first.name in pipeline.REWRITES else None

  @classmethod
  def from_config(cls, data: Mapping[str, Any]) -> AugmentConfig:
    """From `config.data`; a config without the fields (an older run's) means off."""
    raw = data.get('augment', ())
    raw = (raw,) if isinstance(raw, str) else tuple(raw)
    copies = data.get('augment_copies', 1)
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:
      raise ValueError(f'{FIELD}_copies={copies!r} must be an integer >= 0 (augmented copies '
                       f'of each training example per epoch)')
    mask = data.get('augment_mask', '')
    if not isinstance(mask, str) or mask != mask.strip() or len(mask.split()) > 1:
      raise ValueError(f'{FIELD}_mask={mask!r} must be one word without spaces, or \'\' for '
                       f"the tokenizer's mask token")
    operations = tuple(_operation(i, spec) for i, spec in enumerate(raw))
    generator = None
    if rewrites := [i for i, op in enumerate(operations) if op.name in pipeline.REWRITES]:
      _check_rewrite_place(rewrites, raw)
      if 'rewrite' not in data:
        raise ValueError(f'{FIELD}[0]={raw[0]!r}: rewrite operations apply to '
                         f'config.data.augment of a classification fine-tune (stages finetune, '
                         f'distill, qat, prune, compress), whose config.data.rewrite names the '
                         f'generator')
      generator = RewriteConfig.from_config(data['rewrite'])
    return cls(operations, copies, mask, generator)

  def build(self, seed: int, tokenizer_dir: str | None,
            rewrites: pipeline.Rewrites | None = None) -> pipeline.Augmenter | None:
    """The pipeline's augmenter, or None when augmentation is off. With a rewrite operation,
    `rewrites` are the training examples' rewrites (`rewrites.py`)."""
    if not self.enabled:
      return None
    if self.rewrite and rewrites is None:
      raise ValueError(f'{FIELD}: {self.rewrite.name} needs the rewrites of the training '
                       f'examples, which this stage does not generate')
    mask = self.mask or pipeline.tokenizer_mask(tokenizer_dir)
    edits = tuple(pipeline.bind(op.name, op.rate, mask) for op in self.operations
                  if op.name not in pipeline.REWRITES)
    rate = self.rewrite.rate if self.rewrite else 0.0
    return pipeline.Augmenter(edits, self.copies, seed, rewrites or {}, rate)

  def describe(self) -> str:
    ops = ', '.join(f'{op.name} {op.rate:g}' for op in self.operations)
    return f'{self.copies} augmented cop{"y" if self.copies == 1 else "ies"} per example ({ops})'


def _check_rewrite_place(positions: list[int], raw: tuple) -> None:
  """One rewrite operation, first in the list: it picks the text the others edit."""
  if len(positions) > 1:
    raise ValueError(f'{FIELD}[{positions[1]}]={raw[positions[1]]!r}: a second rewrite '
                     f'operation; at most one ({" or ".join(pipeline.REWRITES)}) per list')
  if positions[0]:
    raise ValueError(f'{FIELD}[{positions[0]}]={raw[positions[0]]!r}: a rewrite operation '
                     f'comes first (it picks the text the edits after it change)')


def _operation(i: int, spec: Any) -> Operation:
  where = f'{FIELD}[{i}]={spec!r}'
  if not isinstance(spec, str):
    raise ValueError(f"{where}: not a string 'operation:rate', e.g. 'swap:0.1'")  # noqa: TRY004
  name, colon, rate_text = spec.strip().partition(':')
  if name not in pipeline.OPERATIONS and name not in pipeline.REWRITES:
    raise ValueError(f'{where}: unknown operation {name!r}; choose from '
                     f'{sorted([*pipeline.OPERATIONS, *pipeline.REWRITES])}')
  if not colon:
    raise ValueError(f"{where}: needs a rate, e.g. '{name}:0.1'")
  try:
    rate = float(rate_text)
  except ValueError:
    raise ValueError(f"{where}: rate {rate_text!r} is not a number (one operation per "
                     f"element: ('delete:0.1', 'swap:0.1'))") from None
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f'{where}: rate {rate:g} is outside [0, 1] (a probability per word or '
                     f'character; for a rewrite, per copy)')
  return Operation(name, rate)

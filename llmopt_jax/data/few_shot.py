"""Few-shot training sets: K labelled examples per class, the rest of the split as unlabelled.

  config.data.shots_per_class = 10   # 0 = the whole training split
  config.data.shots_seed = -1        # -1 = config.seed

Class c keeps the first K of a permutation of its training examples drawn from (seed, c), so
a subset is a function of the data, K and the seed alone: stable for a seed, another one for
another seed, and the K-shot subset of a seed contains its (K-1)-shot subset, so a shots curve
adds examples instead of redrawing them. By default the seed is the run's, so a study over
seeds also varies the subset (few-shot results depend on which examples were drawn as much
as on the initialisation); `shots_seed` pins the subset while the run's seed varies.

Only the training split is cut: validation (carved out of train beforehand, on its own fixed
seed) and test stay whole, so scores remain comparable with full-data runs. The examples left
over are kept as `unlabelled`, the unlabelled text of semi-supervised methods (UDA); their
labels stay in the `Split` for analysis only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from llmopt_jax.data.labelled import LabelledSplits, Split

# Mixed into each class's seed so subsets never coincide with validation carve-outs, which
# draw from (seed, class) too.
_STREAM = 0x46455753  # 'FEWS'


@dataclasses.dataclass(frozen=True)
class FewShot:
  labelled: Split        # K examples of each class (all of a class with fewer), file order
  unlabelled: Split      # the rest of the split, file order
  short: dict[int, int]  # class id -> examples kept, for classes with fewer than K


def select(train: Split, shots: int, seed: int, num_classes: int) -> FewShot:
  """`shots` examples of each of the `num_classes` classes of `train`, drawn from `seed`."""
  if shots < 1:
    raise ValueError(f'shots={shots} must be positive')
  chosen = np.zeros(len(train), bool)
  short = {}
  for c in range(num_classes):
    members = np.flatnonzero(train.labels == c)
    if len(members) < shots:
      short[c] = len(members)
    order = np.random.default_rng([_STREAM, seed, c]).permutation(members)
    chosen[order[:shots]] = True

  def part(mask: np.ndarray) -> Split:
    return Split(tuple(t for t, keep in zip(train.texts, mask) if keep), train.labels[mask])
  return FewShot(part(chosen), part(~chosen), short)


@dataclasses.dataclass(frozen=True)
class FewShotConfig:
  shots: int = 0  # per class; 0 = off
  seed: int = 0

  @classmethod
  def from_config(cls, data: Mapping[str, Any], run_seed: int) -> FewShotConfig:
    """From `config.data`; a config without the fields (an older run's) means off."""
    shots, seed = data.get('shots_per_class', 0), data.get('shots_seed', -1)
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
      raise ValueError(f'config.data.shots_per_class={shots!r} must be an integer >= 0 '
                       f'(0 = the whole training split)')
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < -1:
      raise ValueError(f'config.data.shots_seed={seed!r} must be an integer >= 0, or -1 for '
                       f'config.seed')
    return cls(shots, run_seed if seed == -1 else seed)

  def apply(self, splits: LabelledSplits) -> tuple[LabelledSplits, FewShot | None]:
    """`splits` with train cut to the subset (and the cut named in its notes), and the cut;
    `splits` itself and None when off."""
    if not self.shots:
      return splits, None
    cut = select(splits['train'], self.shots, self.seed, splits.num_classes)
    note = (f'{self.shots} per class of the train split, seed {self.seed} '
            f'({len(cut.labelled)} examples; {len(cut.unlabelled)} left unlabelled)')
    few = dataclasses.replace(splits, splits={**splits.splits, 'train': cut.labelled},
                              train_note=note)
    return few, cut

  def describe_short(self, cut: FewShot, label_names: tuple[str, ...]) -> str:
    """One line naming the classes with fewer than K training examples ('' when none)."""
    if not cut.short:
      return ''
    named = ', '.join(f'{label_names[c]} ({n})' for c, n in sorted(cut.short.items()))
    return (f'config.data.shots_per_class={self.shots}: {len(cut.short)} classes have fewer '
            f'training examples and keep all they have: {named}')

"""An example's augmented copies, drawn from (seed, epoch, example, copy) alone.

Copy 0 of an example is the example itself; copies 1..N apply the configured operations in
order (each with its own random stream), so a training epoch holds every original plus N
edited versions of it, with its label. Because each copy's randomness is a pure function of
the run's seed, the epoch, the example's index in the training split and the copy number,
the data pipeline's position (epoch, position) still determines every batch: a run resumed
from a checkpoint sees bit-identical texts. A copy differs from epoch to epoch, as an image
augmentation does.

A rewrite operation (paraphrase, back-translation: `REWRITES`) is not an edit: its texts come
from a model, precomputed once per run (`rewrites.py`), copy k of example i owning rewrite
k - 1 of it in every epoch. The operation's rate is the probability that the copy starts from
that rewrite rather than from the original, drawn each epoch from a stream of its own, so the
edits after it are those the same copy would get without it (rate 0 is exactly the plain
pipeline). An example without a rewrite (none generated, or dropped by the label filter)
starts from its original.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping

import numpy as np

from llmopt_jax.data.augment import chars, words

# name -> operation(text, rate, rng, ...) -> text. 'mask' takes its token as `token`.
OPERATIONS: dict[str, Callable[..., str]] = {
    'delete': words.delete, 'swap': words.swap, 'insert': words.insert,
    'synonym': words.synonym, 'mask': words.mask,
    'typo': chars.typo, 'char_drop': chars.char_drop, 'case_flip': chars.case_flip,
}
# Operations whose texts a model writes ahead of training (inference/rewriters.py).
REWRITES = ('paraphrase', 'backtranslate')
# Mixed into every augmentation seed, so these streams never coincide with the epoch order's
# (which is drawn from [seed, epoch]).
_STREAM = 0x41554754  # 'AUGT'
# The last seed word of the draw between a copy's rewrite and its original; edits are
# numbered 0, 1, ... there, so the draw never shares a stream with an edit.
_REWRITE_DRAW = 0x52575254  # 'RWRT'
# The mask token when the tokenizer has neither a mask nor an unknown token (byte and
# byte-level BPE tokenizers, which can spell any text).
PLACEHOLDER = '_'

Edit = Callable[[str, np.random.Generator], str]  # text, rng -> edited text
# Example index in the training split -> its rewrites, one per augmented copy (None: none).
Rewrites = Mapping[int, tuple[str | None, ...]]


@dataclasses.dataclass(frozen=True)
class Augmenter:
  """`augmenter(text, epoch, index, copy)` is copy `copy` of example `index` in `epoch`."""
  edits: tuple[Edit, ...]  # the configured edits with their rates bound, in order
  copies: int              # augmented copies per example (the original is copy 0)
  seed: int
  rewrites: Rewrites = dataclasses.field(default_factory=dict)
  rewrite_rate: float = 0.0  # P(a copy starts from its rewrite), per epoch

  def __call__(self, text: str, epoch: int, index: int, copy: int) -> str:
    if copy == 0:
      return text
    edited = self._start(text, epoch, index, copy)
    for position, edit in enumerate(self.edits):
      rng = np.random.default_rng([_STREAM, self.seed, epoch, index, copy, position])
      edited = edit(edited, rng)
    return edited if edited.strip() else text

  def _start(self, text: str, epoch: int, index: int, copy: int) -> str:
    """The text copy `copy` is edited from: its rewrite, drawn at `rewrite_rate`, or `text`."""
    if not self.rewrite_rate:
      return text
    rng = np.random.default_rng([_STREAM, self.seed, epoch, index, copy, _REWRITE_DRAW])
    drawn = rng.random() < self.rewrite_rate
    rewrite = self.rewrites.get(index, ())[copy - 1:copy]
    return rewrite[0] if drawn and rewrite and rewrite[0] else text


def bind(name: str, rate: float, mask_token: str = '[MASK]') -> Edit:
  """Operation `name` at `rate` as an edit of (text, rng)."""
  extra = {'token': mask_token} if name == 'mask' else {}
  return functools.partial(_apply, OPERATIONS[name], rate, extra)


def _apply(operation: Callable[..., str], rate: float, extra: dict, text: str,
           rng: np.random.Generator) -> str:
  return operation(text, rate, rng, **extra)


def tokenizer_mask(tokenizer_dir: str | None) -> str:
  """The mask token a Hugging Face tokenizer directory declares ([MASK] for BERT and MiniLM,
  <mask> for RoBERTa), else its unknown token (<unk> for Llama), else `PLACEHOLDER`: each of
  those is a single token id when it appears in a text."""
  path = os.path.join(tokenizer_dir or '', 'tokenizer_config.json')
  if not tokenizer_dir or not os.path.exists(path):
    return PLACEHOLDER
  with open(path, encoding='utf-8') as f:
    fields = json.load(f)
  for key in ('mask_token', 'unk_token'):
    token = fields.get(key)
    token = token.get('content') if isinstance(token, dict) else token
    if isinstance(token, str) and token.strip():
      return token
  return PLACEHOLDER

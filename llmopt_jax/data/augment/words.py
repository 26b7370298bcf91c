"""Word-level edits of a text (EDA, Wei & Zou 2019, "EDA: Easy Data Augmentation Techniques
for Boosting Performance on Text Classification Tasks"), plus token masking.

Words are the text's whitespace-separated tokens. Each operation takes (text, rate, rng) and
returns the edited text; the rate is a probability per word, so the expected fraction of words
an operation touches is the rate (see each function for what "touch" means). An edit that
would leave no word, or that changes nothing, returns the input text itself, never an empty
or re-spaced copy. All randomness comes from the generator passed in, so a text's edit is a
function of (text, rate, generator state) alone.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from llmopt_jax.data.augment import synonyms as synonyms_lib
from llmopt_jax.data.augment.synonyms import Table

Words = list[str]


def _on_words(edit: Callable[[Words], Words], text: str) -> str:
  """`edit` applied to the text's words; the text itself when it empties or keeps them."""
  words = text.split()
  edited = edit(words)
  return text if not edited or edited == words else ' '.join(edited)


def delete(text: str, rate: float, rng: np.random.Generator) -> str:
  """Random deletion: each word is removed with probability `rate`."""
  def edit(words: Words) -> Words:
    keep = rng.random(len(words)) >= rate
    return [w for w, k in zip(words, keep) if k]
  return _on_words(edit, text)


def swap(text: str, rate: float, rng: np.random.Generator) -> str:
  """Random swap: each word moves to another word's place with probability `rate`.

  m ~ Binomial(n, rate) positions are drawn and their words rotated one place along a random
  cycle, so every drawn word moves. One drawn word cannot move alone: m = 1 becomes 0 or 2 with
  equal odds, which keeps E[m] = n * rate, so each word moves with probability exactly `rate`
  (texts of two or more words). EDA's swaps of random pairs move each word less often than
  their count suggests, as later swaps undo earlier ones.
  """
  def edit(words: Words) -> Words:
    moved = rng.binomial(len(words), rate) if len(words) > 1 else 0
    if moved == 1:
      moved = 2 * int(rng.integers(2))
    places = rng.choice(len(words), moved, replace=False)  # in random order: a random cycle
    edited = list(words)
    for k, place in enumerate(places):
      edited[places[(k + 1) % moved]] = words[place]
    return edited
  return _on_words(edit, text)


def insert(text: str, rate: float, rng: np.random.Generator, table: Table | None = None) -> str:
  """Random insertion: Binomial(n, rate) times, a synonym of a random word of the text (one
  that has synonyms) goes to a random place, so words grow by `rate` on average. Texts with
  no word in the synonym table are left as they are."""
  table = synonyms_lib.table() if table is None else table

  def edit(words: Words) -> Words:
    sources = [options for w in words if (options := synonyms_lib.lookup(w, table))]
    if not sources:
      return words
    edited = list(words)
    for _ in range(rng.binomial(len(words), rate)):
      options = sources[rng.integers(len(sources))]
      edited.insert(int(rng.integers(len(edited) + 1)), options[rng.integers(len(options))])
    return edited
  return _on_words(edit, text)


def synonym(text: str, rate: float, rng: np.random.Generator, table: Table | None = None) -> str:
  """Synonym replacement: each word that has synonyms is replaced by one of them, drawn
  uniformly, with probability `rate`; punctuation and capitalisation stay. Words without
  synonyms (function words, names, numbers) are never touched, so `rate` is per such word."""
  table = synonyms_lib.table() if table is None else table

  def edit(words: Words) -> Words:
    hits = rng.random(len(words)) < rate
    edited = list(words)
    for i, word in enumerate(words):
      if hits[i] and (options := synonyms_lib.lookup(word, table)):
        edited[i] = synonyms_lib.replace_word(word, options[rng.integers(len(options))])
    return edited
  return _on_words(edit, text)


def mask(text: str, rate: float, rng: np.random.Generator, token: str = '[MASK]') -> str:
  """Token masking: each word (with its punctuation) becomes `token` with probability `rate`,
  as in BERT's masked inputs and UDA's word replacement; the model then has to classify from
  the words left."""
  def edit(words: Words) -> Words:
    hits = rng.random(len(words)) < rate
    return [token if hit else w for w, hit in zip(words, hits)]
  return _on_words(edit, text)

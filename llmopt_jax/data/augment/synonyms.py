"""The synonym table behind synonym replacement and random insertion, shipped in this folder.

Chosen over nearest neighbours in a model's embedding space because it needs no model, means
the same thing whichever tokenizer a run uses, and can be read and checked by a person.
`synonyms.tsv` is derived offline from WordNet 3.0 (`build_synonyms.py`; provenance and the
WordNet license in SYNONYMS_PROVENANCE.md) and holds the words of the shipped Banking77 and
CLINC150 data, function words excepted, with their one-word WordNet synonyms, most frequent
sense first. A word outside it (a user's domain term) simply has no synonyms: the operations
leave it alone. Nothing is downloaded at run time.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'synonyms.tsv')
# A whitespace-separated token as (leading punctuation, word, trailing punctuation): "card?"
# is looked up as "card" and keeps its "?" when replaced.
_TOKEN = re.compile(r'(\W*)(.*?)(\W*)', re.DOTALL)

Table = Mapping[str, tuple[str, ...]]


@functools.cache
def table() -> Table:
  """Lowercase word -> its synonyms (lowercase, one word each, none equal to the word)."""
  with open(TABLE, encoding='utf-8') as f:
    rows = (line.rstrip('\n').split('\t') for line in f)
    return {word: tuple(synonyms.split()) for word, synonyms in rows}


def split_token(token: str) -> tuple[str, str, str]:
  """(prefix, word, suffix) of a whitespace-separated token; the word may be ''."""
  prefix, word, suffix = _TOKEN.fullmatch(token).groups()
  return prefix, word, suffix


def lookup(token: str, synonyms: Table) -> tuple[str, ...]:
  """Synonyms of a token's word (case and punctuation ignored); () when it has none."""
  return synonyms.get(split_token(token)[1].lower(), ())


def replace_word(token: str, synonym: str) -> str:
  """`token` with its word replaced by `synonym`, keeping punctuation and capitalisation."""
  prefix, word, suffix = split_token(token)
  if len(word) > 1 and word.isupper():
    synonym = synonym.upper()
  elif word[:1].isupper():
    synonym = synonym[:1].upper() + synonym[1:]
  return prefix + synonym + suffix

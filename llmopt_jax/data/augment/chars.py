"""Character noise: keyboard typos, dropped characters and flipped case, as users type.

Each operation takes (text, rate, rng) and returns the edited text; the rate is a probability
per eligible character (a letter for typos, a non-space character for drops, a character with
another case for case flips), so the expected fraction of eligible characters edited is the
rate. Spaces are never edited, so words keep their boundaries. An edit that leaves no
non-space character returns the input text. Case flips are invisible to an uncased tokenizer
(MiniLM's lowercases everything); they are for cased models.
"""

from __future__ import annotations

import numpy as np

# QWERTY rows and how far each is shifted right of the one above, in key widths.
_ROWS = ('qwertyuiop', 'asdfghjkl', 'zxcvbnm')
_SHIFT = (0.0, 0.25, 0.75)


def _neighbours() -> dict[str, str]:
  """Letter -> the letters of the keys touching it: left and right on its row, and the keys
  of the rows above and below that overlap it."""
  place = {key: (row, col + _SHIFT[row]) for row, keys in enumerate(_ROWS)
           for col, key in enumerate(keys)}
  def touching(a: str, b: str) -> bool:
    (ra, xa), (rb, xb) = place[a], place[b]
    return a != b and ((ra == rb and abs(xa - xb) == 1) or (abs(ra - rb) == 1
                                                             and abs(xa - xb) < 1))
  return {a: ''.join(b for b in place if touching(a, b)) for a in place}


NEIGHBOURS = _neighbours()


def _edit(text: str, eligible: np.ndarray, rate: float, rng: np.random.Generator,
          change) -> str:
  """`text` with `change(char)` at each eligible position drawn with probability `rate`."""
  hits = eligible & (rng.random(len(text)) < rate)
  if not hits.any():
    return text
  edited = ''.join(change(c, rng) if hit else c for c, hit in zip(text, hits))
  return edited if edited.strip() else text


def typo(text: str, rate: float, rng: np.random.Generator) -> str:
  """Each ASCII letter becomes a neighbouring key's letter (same case) with probability `rate`."""
  eligible = np.array([c.lower() in NEIGHBOURS for c in text], bool)

  def change(c: str, rng: np.random.Generator) -> str:
    options = NEIGHBOURS[c.lower()]
    new = options[rng.integers(len(options))]
    return new.upper() if c.isupper() else new
  return _edit(text, eligible, rate, rng, change)


def char_drop(text: str, rate: float, rng: np.random.Generator) -> str:
  """Each non-space character is dropped with probability `rate`."""
  eligible = np.array([not c.isspace() for c in text], bool)
  return _edit(text, eligible, rate, rng, lambda c, rng: '')


def case_flip(text: str, rate: float, rng: np.random.Generator) -> str:
  """Each character that has another case (one character long) flips case with probability
  `rate`."""
  eligible = np.array([len(c.swapcase()) == 1 and c.swapcase() != c for c in text], bool)
  return _edit(text, eligible, rate, rng, lambda c, rng: c.swapcase())

"""TFDS builder for the shipped tiny Shakespeare corpus, one example per speech.

The corpus (`input.txt`, see PROVENANCE.md) is read from this folder; nothing is downloaded.
Speeches are the blocks between blank lines ('\\n\\n'), kept byte for byte, so joining all of
them with '\\n\\n' and a final '\\n' gives back the file exactly. (At the two play boundaries
the file has two blank lines, so those speeches begin with '\\n'.)

Splits: there is no official one. Like nanoGPT we train on the first ~90% of characters and
validate on the rest, but cut at the first speech that starts at or after 90%, so no speech
is split in two.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from llmopt_jax.data import utf8

_CITATION = r"""@misc{karpathy2015charrnn,
  author       = {Andrej Karpathy},
  title        = {char-rnn: Multi-layer Recurrent Neural Networks for character-level
                  language models},
  year         = {2015},
  howpublished = {\url{https://github.com/karpathy/char-rnn}}
}"""

_DESCRIPTION = """Tiny Shakespeare (Karpathy, char-rnn): about 40,000 lines of Shakespeare's plays,
one example per speech (speaker line plus text). Train is the first ~90% of characters,
validation the rest, cut at a speech boundary. See also A. Karpathy, "The Unreasonable
Effectiveness of Recurrent Neural Networks", http://karpathy.github.io/2015/05/21/rnn-effectiveness/
"""

TRAIN_FRACTION = 0.9
SEPARATOR = '\n\n'


# TFDS' own catalogue already registers `tiny_shakespeare` (one example per split, downloaded
# from the web). We do not register ours at all (callers look it up in a plain dict, see
# `sources.py`) and give it its own `name`, so that its prepared files live in their own
# folder of a shared data_dir and can never be mistaken for the catalogue's.
class TinyShakespeare(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Tiny Shakespeare speeches, read from the copy shipped with llmopt_jax."""

  name = 'llmopt_tiny_shakespeare'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'One example per speech; train/validation cut at ~90% of the characters.',
  }
  # A class attribute rather than a constant so that tests can point it elsewhere.
  corpus_path: epath.Path = epath.Path(__file__).parent / 'input.txt'
  # TFDS 4.9.10 derives this through `importlib_resources`, a backport it only declares as a
  # dependency for Python < 3.9, so on 3.11 preparing fails with ModuleNotFoundError. The
  # answer is simply this file.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        homepage='https://github.com/karpathy/char-rnn',
        citation=_CITATION,
        license='Public domain text (Shakespeare); containing repository: MIT.',
        # Keep the speeches in corpus order, so that a split read in order is the text itself.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    speeches = read_speeches(self.corpus_path)
    cut = split_index(speeches)
    return {
        'train': self._generate_examples(speeches, 0, cut),
        'validation': self._generate_examples(speeches, cut, len(speeches)),
    }

  def _generate_examples(self, speeches: Sequence[str], start: int,
                         stop: int) -> Iterator[tuple[int, dict[str, str]]]:
    # The key is the speech's index in the corpus: deterministic, and sorted in corpus order.
    for i in range(start, stop):
      yield i, {'text': speeches[i]}


def read_speeches(path: epath.Path) -> list[str]:
  """The blocks of the corpus between blank lines; fails with the file name when unusable."""
  if not path.exists():
    raise FileNotFoundError(f'corpus file {path} is missing')
  text = utf8.decode(path.read_bytes(), path)  # a non-UTF-8 byte is named by its offset
  if not text.strip():
    raise ValueError(f'corpus file {path} is empty')
  return text.removesuffix('\n').split(SEPARATOR)


def split_index(speeches: Sequence[str]) -> int:
  """Index of the first validation speech: the first one starting at >= 90% of the chars."""
  lengths = np.array([len(s) + len(SEPARATOR) for s in speeches])
  starts = np.cumsum(lengths) - lengths
  cut = int(np.searchsorted(starts, TRAIN_FRACTION * lengths.sum()))
  # Both splits must be non-empty, even for a corpus of one or two speeches.
  return min(max(cut, 1), max(len(speeches) - 1, 1))

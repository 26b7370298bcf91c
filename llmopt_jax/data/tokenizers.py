"""Tokenizers: raw UTF-8 bytes, or byte-level BPE trained on the corpus.

Both map any Unicode text to int32 ids and back without loss, so a model trained on one corpus
can read any other text. Every tokenizer reserves two special ids the input pipeline needs:
`eos_id` ends each document in the packed stream, `pad_id` fills the tail of eval batches
(always with weight 0, so its value never reaches a loss).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import jax
import numpy as np
import tokenizers as hf_tokenizers
from jax.experimental import multihost_utils
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD, EOS = '<pad>', '<eos>'


class Tokenizer(Protocol):
  """What the input pipeline and the decoders need from a tokenizer."""

  @property
  def vocab_size(self) -> int: ...

  @property
  def pad_id(self) -> int: ...

  @property
  def eos_id(self) -> int: ...

  def encode(self, text: str) -> np.ndarray: ...  # int32[n], no special ids added

  def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...  # special ids are dropped


class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; pad is 256 and eos is 257, so the vocabulary has 258 ids.

  Nothing to train or store, which makes it the reference point for every other tokenizer.
  """

  vocab_size = 258
  pad_id = 256
  eos_id = 257

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, dtype=np.int64)
    data = ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()
    # A model may emit a byte sequence that is not valid UTF-8; show it rather than crash.
    return data.decode('utf-8', errors='replace')


class BpeTokenizer:
  """Byte-level BPE (GPT-2 style) from the Hugging Face `tokenizers` package.

  The pre-tokenizer maps every byte to a printable symbol and the trainer starts from all 256
  of them, so any text encodes and `decode(encode(s)) == s` exactly. No prefix space is added
  and no offsets are trimmed, since either would change the text on the way back.
  """

  def __init__(self, tokenizer: hf_tokenizers.Tokenizer):
    pad_id, eos_id = tokenizer.token_to_id(PAD), tokenizer.token_to_id(EOS)
    if pad_id is None or eos_id is None:
      raise ValueError(f'BPE tokenizer lacks the special tokens {PAD} and {EOS}')
    # A literal '<eos>' in the text must encode as plain bytes: the only end-of-document ids
    # in the stream are the ones the pipeline appends. The flag is not saved in the JSON file.
    tokenizer.encode_special_tokens = True
    self._tokenizer = tokenizer
    self.pad_id: int = pad_id
    self.eos_id: int = eos_id
    self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int) -> BpeTokenizer:
    """Learns merges until the vocabulary (256 bytes, 2 specials, merges) has `vocab_size`."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
      raise ValueError(f'BPE vocab_size={vocab_size} must be at least {len(alphabet) + 2} '
                       '(256 byte symbols and the <pad>, <eos> specials)')
    tokenizer = hf_tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, EOS], initial_alphabet=alphabet,
        show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return cls(tokenizer)

  def save(self, path: str) -> None:
    """Writes the JSON atomically, so a crash or a concurrent reader never sees half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        'w', dir=directory, prefix='.tokenizer-', suffix='.tmp', delete=False,
        encoding='utf-8') as f:
      f.write(self._tokenizer.to_str())
      f.flush()
      os.fsync(f.fileno())
    os.replace(f.name, path)

  @classmethod
  def load(cls, path: str) -> BpeTokenizer:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'BPE tokenizer file {path} does not exist')
    try:
      return cls(hf_tokenizers.Tokenizer.from_file(path))
    except Exception as e:  # The Rust errors are of no single type; all mean "unreadable".
      reason = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise ValueError(f'cannot load BPE tokenizer from {path}: {reason}') from e

  def encode(self, text: str) -> np.ndarray:
    ids = self._tokenizer.encode(text, add_special_tokens=False).ids
    return np.asarray(ids, dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=True)


def get_tokenizer(kind: str, *, vocab_size: int, path: str | None,
                  train_texts: Callable[[], Iterable[str]]) -> Tokenizer:
  """The tokenizer `config.data.tokenizer` names, trained and cached at `path` for BPE.

  `vocab_size` is the model's vocabulary; a tokenizer needing more ids is an error, fewer is
  fine (models often round their vocabulary up for speed).
  """
  if kind == 'byte':
    tokenizer = ByteTokenizer()
  elif kind == 'bpe':
    tokenizer = _get_bpe(vocab_size, path, train_texts)
  else:
    raise ValueError(f"config.data.tokenizer={kind!r} is unknown; use 'byte' or 'bpe'")
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f'the {kind} tokenizer{f" at {path}" if path else ""} has '
                     f'{tokenizer.vocab_size} ids but the vocab_size is {vocab_size}')
  return tokenizer


def _get_bpe(vocab_size: int, path: str | None,
             train_texts: Callable[[], Iterable[str]]) -> BpeTokenizer:
  """Loads `path`, training and saving it first (on process 0) when it does not exist yet."""
  if path is None:
    if jax.process_count() > 1:
      raise ValueError('a BPE tokenizer needs a file path when training on several processes, '
                       'so that all of them read the same merges')
    return BpeTokenizer.train(train_texts(), vocab_size)
  if jax.process_index() == 0 and not os.path.exists(path):
    BpeTokenizer.train(train_texts(), vocab_size).save(path)
  if jax.process_count() > 1:
    # The others wait here until process 0 has written the file (shared filesystem assumed).
    multihost_utils.sync_global_devices('tokenizer')
  return BpeTokenizer.load(path)

"""Packed language-model batches: sharded, deterministic, and exactly resumable.

Documents are tokenized as `encode(text) + [eos]` and concatenated into one token stream.
A row is a window of T + 1 tokens and the next row starts T tokens later, so consecutive rows
share one token and every transition of the stream is a target exactly once.

Training walks, epoch after epoch, a fresh permutation of the documents of which data shard
s of n takes every n-th, so shards are disjoint and together cover the split. A process reads
one or more shards (`ShardedBatches` stacks their rows); because the number of shards is fixed
by the config, not by the number of processes, the global batch is the same whether one
process or many read it. A shard's position is three integers (epoch, doc, offset), which is
all a checkpoint needs to resume with the very batches an uninterrupted run would produce.

With an `Augmenter` of c copies (data/augment/) an epoch reads N(1 + c) virtual documents of
a split of N: the permutation is over them, and virtual document v is copy v // N of document
v % N (copy 0 is the document as it is), edited as a function of (seed, epoch, document, copy)
alone. Shards split virtual documents as they split documents, and `doc` in the position
counts virtual documents, so resumes stay exact. Every original is still read once an epoch:
augmentation adds text, never hides any. Without an augmenter the batches are exactly those of
a pipeline that never heard of augmentation; eval batches are never augmented.

Shapes: b = batch rows (of this shard), T = seq_len.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator

import numpy as np

from llmopt_jax.data.augment.pipeline import Augmenter
from llmopt_jax.data.sources import TextSource
from llmopt_jax.data.tokenizers import Tokenizer

Batch = dict[str, np.ndarray]


def iter_texts(source: TextSource) -> Iterator[str]:
  """All texts of a source in order, e.g. to train a tokenizer on the train split."""
  for i in range(len(source)):
    yield source[i]


def _doc_tokens(tokenizer: Tokenizer, text: str) -> np.ndarray:
  return np.append(tokenizer.encode(text), np.int32(tokenizer.eos_id)).astype(np.int32)


def _window_index(seq_len: int, batch_size: int) -> np.ndarray:
  """int[b, T + 1]: where each row's tokens sit in a flat stream starting at row 0."""
  return np.arange(batch_size)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]


def check_shard(batch_size: int, shard_index: int, shard_count: int, size: int,
                unit: str) -> None:
  """The arguments every sharded batch iterator takes are sane (one-line errors)."""
  if batch_size < 1:
    raise ValueError(f'batch_size={batch_size} must be positive')
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index={shard_index} is not in [0, {shard_count})')
  if size < shard_count:
    raise ValueError(f'{size} {unit} cannot be split into {shard_count} shards')


class LMBatches:
  """Iterator of training batches {'inputs', 'targets': int32[b, T], 'weights': f32[b, T]}."""

  def __init__(self, source: TextSource, tokenizer: Tokenizer, *, seq_len: int,
               batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1,
               augment: Augmenter | None = None, state: dict[str, int] | None = None):
    if seq_len < 1:
      raise ValueError(f'seq_len={seq_len} must be positive')
    self._copies = augment.copies if augment is not None else 0
    check_shard(batch_size, shard_index, shard_count, len(source) * (1 + self._copies),
                'documents')
    self._source, self._tokenizer, self._augment = source, tokenizer, augment
    self._seq_len, self._batch_size, self._seed = seq_len, batch_size, seed
    self._shard_index, self._shard_count = shard_index, shard_count
    self._index = _window_index(seq_len, batch_size)
    self._orders: dict[int, np.ndarray] = {}
    self.set_state(state or {'epoch': 0, 'doc': 0, 'offset': 0})

  def __iter__(self) -> LMBatches:
    return self

  def __next__(self) -> Batch:
    n = self._batch_size * self._seq_len
    self._fill(n + 1)
    rows = self._buffer[self._index]  # int32[b, T + 1]
    self._advance(n)
    return {
        'inputs': np.ascontiguousarray(rows[:, :-1]),
        'targets': np.ascontiguousarray(rows[:, 1:]),
        'weights': np.ones((self._batch_size, self._seq_len), np.float32),
    }

  def get_state(self) -> dict[str, int]:
    """Where the next row starts: JSON-ready ints, the same size whatever the batch shape."""
    return {'epoch': self._epoch, 'doc': self._doc, 'offset': self._offset,
            'shard_index': self._shard_index, 'shard_count': self._shard_count}

  def set_state(self, state: dict[str, int]) -> None:
    """Moves to a position from `get_state`; only the document there is re-tokenized."""
    if missing := {'epoch', 'doc', 'offset'} - set(state):
      raise ValueError(f'data state {state} lacks {sorted(missing)}')
    epoch, doc, offset = (int(state[k]) for k in ('epoch', 'doc', 'offset'))
    shard = (state.get('shard_index', self._shard_index),
             state.get('shard_count', self._shard_count))
    if shard != (self._shard_index, self._shard_count):
      raise ValueError(f'data state of shard {shard[0]} of {shard[1]} cannot resume shard '
                       f'{self._shard_index} of {self._shard_count}')
    if epoch < 0 or not 0 <= doc < len(self._order(epoch)):
      raise ValueError(f'data state {state} points outside epoch {epoch} of this shard')
    tokens = self._tokens(epoch, doc)
    if not 0 <= offset < len(tokens):
      raise ValueError(f'data state {state} offset is outside its document '
                       f'({len(tokens)} tokens); was the tokenizer changed?')
    self._epoch, self._doc, self._offset = epoch, doc, offset
    self._buffer = tokens[offset:]  # The stream from the position on.
    self._lengths = collections.deque([len(tokens)])  # Token counts of documents in buffer.
    self._next = self._following(epoch, doc)  # Next document to tokenize.

  def _order(self, epoch: int) -> np.ndarray:
    """This shard's (virtual) document indices for `epoch`, in the order it reads them."""
    if epoch not in self._orders:
      rng = np.random.default_rng([self._seed, epoch])
      # Without copies this is the permutation of the documents, drawn as it always was.
      perm = rng.permutation(len(self._source) * (1 + self._copies))
      self._orders[epoch] = perm[self._shard_index::self._shard_count]
      # Reading touches at most the current and the next epoch; drop anything older.
      for old in [e for e in self._orders if e < epoch - 1]:
        del self._orders[old]
    return self._orders[epoch]

  def _following(self, epoch: int, doc: int) -> tuple[int, int]:
    return (epoch, doc + 1) if doc + 1 < len(self._order(epoch)) else (epoch + 1, 0)

  def _tokens(self, epoch: int, doc: int) -> np.ndarray:
    copy, index = divmod(int(self._order(epoch)[doc]), len(self._source))
    text = self._source[index]
    if copy:  # copy 0 is the document itself, with or without an augmenter
      text = self._augment(text, epoch, index, copy)
    return _doc_tokens(self._tokenizer, text)

  def _fill(self, size: int) -> None:
    """Tokenizes documents until the buffer holds at least `size` tokens."""
    chunks, total = [self._buffer], len(self._buffer)
    while total < size:
      tokens = self._tokens(*self._next)
      chunks.append(tokens)
      self._lengths.append(len(tokens))
      total += len(tokens)
      self._next = self._following(*self._next)
    if len(chunks) > 1:
      self._buffer = np.concatenate(chunks)

  def _advance(self, n: int) -> None:
    """Moves the position n tokens on; the buffer must hold more than n tokens."""
    self._buffer = self._buffer[n:]
    offset = self._offset + n
    while offset >= self._lengths[0]:  # Every document has >= 1 token (its eos).
      offset -= self._lengths.popleft()
      self._epoch, self._doc = self._following(self._epoch, self._doc)
    self._offset = offset


def eval_batches(source: TextSource, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                 shard_index: int = 0, shard_count: int = 1,
                 max_batches: int | None = None) -> list[Batch]:
  """A shard's documents in order, packed like training; the tail padded with weight 0.

  Summing `weights` over the batches counts each target of the shard's stream once, i.e.
  (tokens in the stream - 1), so sums of losses and weights give exact perplexity. Processes
  may get different numbers of batches.
  """
  docs = (source[i] for i in range(shard_index, len(source), shard_count))
  stream = (_doc_tokens(tokenizer, text) for text in docs)  # Tokenized lazily.
  batches = _packed_batches(stream, seq_len, batch_size, tokenizer.pad_id)
  return list(itertools.islice(batches, max_batches))


class ShardedBatches:
  """The batches of several data shards read by one process, stacked along the rows."""

  def __init__(self, shards: list[LMBatches]):
    self._shards = shards

  def __iter__(self) -> ShardedBatches:
    return self

  def __next__(self) -> Batch:
    batches = [next(shard) for shard in self._shards]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self) -> dict[str, list[dict[str, int]]]:
    return {'shards': [shard.get_state() for shard in self._shards]}

  def set_state(self, state: dict[str, list[dict[str, int]]]) -> None:
    if len(state['shards']) != len(self._shards):
      raise ValueError(f'data state holds {len(state["shards"])} shards, this process reads '
                       f'{len(self._shards)}')
    for shard, shard_state in zip(self._shards, state['shards']):
      shard.set_state(shard_state)


def pad_batches(batches: list[Batch], count: int, template: Batch) -> list[Batch]:
  """`batches` plus zero-weight copies of `template` up to `count` batches.

  Every process must run the same number of eval steps (each is a collective over all
  devices), but processes may hold different numbers of eval batches.
  """
  filler = {k: np.zeros_like(v) for k, v in template.items()}
  return batches + [filler] * (count - len(batches))


def _packed_batches(stream: Iterator[np.ndarray], seq_len: int, batch_size: int,
                    pad_id: int) -> Iterator[Batch]:
  n = batch_size * seq_len
  chunks, total = [], 0
  for tokens in stream:
    chunks.append(tokens)
    total += len(tokens)
    if total > n:
      flat = np.concatenate(chunks)
      while len(flat) > n:
        yield _padded_batch(flat[:n + 1], seq_len, batch_size, pad_id)
        flat = flat[n:]  # The last token of a batch is the first input of the next.
      chunks, total = [flat], len(flat)
  flat = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
  if len(flat) > 1:
    yield _padded_batch(flat, seq_len, batch_size, pad_id)


def _padded_batch(flat: np.ndarray, seq_len: int, batch_size: int, pad_id: int) -> Batch:
  """A batch from up to b*T + 1 tokens; targets beyond the tokens get pad_id and weight 0."""
  index = _window_index(seq_len, batch_size)
  padded = np.full(batch_size * seq_len + 1, pad_id, np.int32)
  padded[:len(flat)] = flat
  rows = padded[index]  # int32[b, T + 1]
  return {
      'inputs': np.ascontiguousarray(rows[:, :-1]),
      'targets': np.ascontiguousarray(rows[:, 1:]),
      'weights': (index[:, 1:] < len(flat)).astype(np.float32),
  }

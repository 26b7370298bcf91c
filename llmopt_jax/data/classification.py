"""Classification batches: sharded, deterministic, exactly resumable, tokenizer-agnostic.

Texts become ids through an injected `encode(texts) -> (ids, mask, token_types)`, each
[n, T], so the same pipeline feeds a BERT WordPiece encoder, a Llama BPE decoder, or the
bytes or BPE of a decoder pretrained here (`token_encoder`). Every example is its own padded
row: no packing, since a classifier reads one query at a time.

Training walks, epoch after epoch, an order of the examples drawn from (seed, epoch), of
which data shard s of n takes every n-th, so shards are disjoint and together cover the
epoch; `lm_pipeline.ShardedBatches` stacks the shards one process reads, as for LM training.
The order is a permutation, or with `balanced=True` a class-balanced draw (each position
picks a class uniformly, then that class's next example), so a rare intent is seen as often
as a common one. A shard's position is two integers, (epoch, position), which is all a
checkpoint needs to resume with the very batches an uninterrupted run would produce.

With an `Augmenter` (data/augment/) an epoch holds each example 1 + copies times: row r of the
order is copy r // n of example r % n (n examples; copy 0 is the example as it is), and the
copy's text is edited as a function of (seed, epoch, example, copy), so the position above
still fixes every batch. Without one, batches are exactly those of a pipeline that never
heard of augmentation.

Batch (b = rows of this shard, T = seq_len):
  tokens       int32[b, T]
  padding_mask bool[b, T]    True at real tokens
  token_types  int32[b, T]   segment ids (BERT); zeros for single texts
  labels       int32[b]
  weights      float32[b]    0 for the padding rows of eval batches
  index        int32[b]      training batches only: the rows' example ids in the split
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from llmopt_jax.data import lm_pipeline
from llmopt_jax.data.augment.pipeline import Augmenter
from llmopt_jax.data.labelled import Split
from llmopt_jax.data.tokenizers import ByteTokenizer, Tokenizer

Batch = dict[str, np.ndarray]
Encode = Callable[[list[str]], tuple[np.ndarray, np.ndarray, np.ndarray]]


def token_encoder(tokenizer: Tokenizer, seq_len: int) -> Encode:
  """A pipeline tokenizer's ids behind a leading eos id, cut or padded with its pad id to
  `seq_len`. The eos is where every document of a packed LM stream starts (the previous one
  ended there), so a decoder pretrained by this project reads a query as it read documents;
  it also stands in for [CLS] under first-token pooling."""
  def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.full((len(texts), seq_len), tokenizer.pad_id, np.int32)
    for row, text in enumerate(texts):
      seq = np.concatenate([[tokenizer.eos_id], tokenizer.encode(text)])[:seq_len]
      ids[row, :len(seq)] = seq
    return ids, ids != tokenizer.pad_id, np.zeros_like(ids)
  return encode


def byte_encoder(seq_len: int) -> Encode:
  """`token_encoder` of UTF-8 bytes: needs no files; for tiny runs and tests."""
  return token_encoder(ByteTokenizer(), seq_len)


def _batch(encode: Encode, texts: list[str], labels: np.ndarray, weights: np.ndarray) -> Batch:
  ids, mask, types = encode(texts)
  if not ids.shape == mask.shape == types.shape or ids.shape[0] != len(texts):
    raise ValueError(f'encode returned ids {ids.shape}, mask {mask.shape}, token_types '
                     f'{types.shape} for {len(texts)} texts; all must be [n, T]')
  return {'tokens': np.asarray(ids, np.int32), 'padding_mask': np.asarray(mask, bool),
          'token_types': np.asarray(types, np.int32), 'labels': np.asarray(labels, np.int32),
          'weights': np.asarray(weights, np.float32)}


def epoch_order(labels: np.ndarray, seed: int, epoch: int, balanced: bool = False) -> np.ndarray:
  """Example indices of one epoch (as many as examples), drawn from (seed, epoch) alone.

  Balanced: the class of each position is uniform over the classes present, and a class's
  examples are used in a fresh permutation of them, cycling when the class is drawn more
  often than it has examples (oversampling rare classes, undersampling common ones).
  """
  rng = np.random.default_rng([seed, epoch])
  if not balanced:
    return rng.permutation(len(labels))
  classes = np.unique(labels)
  drawn = rng.integers(len(classes), size=len(labels))  # class (as an index into `classes`)
  order = np.empty(len(labels), np.int64)
  for k, c in enumerate(classes):
    slots = np.flatnonzero(drawn == k)
    members = rng.permutation(np.flatnonzero(labels == c))
    order[slots] = members[np.arange(len(slots)) % len(members)]
  return order


class ClassificationBatches:
  """Iterator of training batches of one data shard (see the module docstring for keys)."""

  def __init__(self, split: Split, encode: Encode, *, batch_size: int, seed: int,
               shard_index: int = 0, shard_count: int = 1, balanced: bool = False,
               augment: Augmenter | None = None, state: dict[str, int] | None = None):
    self._augment = augment
    # One label per row of an epoch: each example's, once per copy.
    self._row_labels = np.tile(split.labels, 1 + (augment.copies if augment else 0))
    lm_pipeline.check_shard(batch_size, shard_index, shard_count, len(self._row_labels),
                            'examples')
    self._split, self._encode = split, encode
    self._batch_size, self._seed, self._balanced = batch_size, seed, balanced
    self._shard_index, self._shard_count = shard_index, shard_count
    self._orders: dict[int, np.ndarray] = {}
    self.set_state(state or {'epoch': 0, 'position': 0})

  def __iter__(self) -> ClassificationBatches:
    return self

  def __next__(self) -> Batch:
    chunks, epochs, needed = [], [], self._batch_size
    while needed:
      order = self._order(self._epoch)
      chunks.append(order[self._position:self._position + needed])
      epochs.append(np.full(len(chunks[-1]), self._epoch))
      needed -= len(chunks[-1])
      self._position += len(chunks[-1])
      if self._position == len(order):  # An epoch may end inside a batch; go on to the next.
        self._epoch, self._position = self._epoch + 1, 0
    rows = np.concatenate(chunks)
    picked, copies = rows % len(self._split), rows // len(self._split)
    texts = [self._split.texts[i] for i in picked]
    if self._augment is not None:
      texts = [self._augment(text, int(epoch), int(i), int(copy))
               for text, epoch, i, copy in zip(texts, np.concatenate(epochs), picked, copies)]
    batch = _batch(self._encode, texts, self._split.labels[picked],
                   np.ones(len(picked), np.float32))
    batch['index'] = picked.astype(np.int32)  # for per-example side data (a teacher cache)
    return batch

  def get_state(self) -> dict[str, int]:
    """Where the next row starts: JSON-ready ints."""
    return {'epoch': self._epoch, 'position': self._position,
            'shard_index': self._shard_index, 'shard_count': self._shard_count}

  def set_state(self, state: dict[str, int]) -> None:
    if missing := {'epoch', 'position'} - set(state):
      raise ValueError(f'data state {state} lacks {sorted(missing)}')
    epoch, position = int(state['epoch']), int(state['position'])
    shard = (state.get('shard_index', self._shard_index),
             state.get('shard_count', self._shard_count))
    if shard != (self._shard_index, self._shard_count):
      raise ValueError(f'data state of shard {shard[0]} of {shard[1]} cannot resume shard '
                       f'{self._shard_index} of {self._shard_count}')
    if epoch < 0 or not 0 <= position < len(self._order(epoch)):
      raise ValueError(f'data state {state} points outside epoch {epoch} of this shard')
    self._epoch, self._position = epoch, position

  def _order(self, epoch: int) -> np.ndarray:
    """This shard's rows (example indices, plus n per copy) for `epoch`, in reading order."""
    if epoch not in self._orders:
      order = epoch_order(self._row_labels, self._seed, epoch, self._balanced)
      self._orders = {epoch: order[self._shard_index::self._shard_count]}  # Keep one epoch.
    return self._orders[epoch]


def num_eval_batches(num_examples: int, batch_size: int, shard_count: int,
                     max_batches: int | None = None) -> int:
  """Eval batches of every shard: enough for the largest, so all processes step together.

  Known on every process from the split's size alone, so no collective is needed to agree.
  """
  largest = -(-num_examples // shard_count)
  count = max(-(-largest // batch_size), 1)
  return min(count, max_batches) if max_batches else count


def eval_batches(split: Split, encode: Encode, *, batch_size: int, shard_index: int = 0,
                 shard_count: int = 1, max_batches: int | None = None) -> list[Batch]:
  """Examples shard_index, shard_index + shard_count, ... of `split` in order, in batches.

  Every shard gets `num_eval_batches(...)` batches of exactly `batch_size` rows; rows past the
  shard's examples are weight-0 copies of a real example (not empty rows, which a model that
  masks padding could turn into NaN logits, and NaN * 0 is NaN in a sum). Summing weights
  over all shards and batches counts each example once (with `max_batches`, a prefix).
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index={shard_index} is not in [0, {shard_count})')
  if not len(split):
    raise ValueError('cannot evaluate on an empty split')
  mine = np.arange(shard_index, len(split), shard_count)
  count = num_eval_batches(len(split), batch_size, shard_count, max_batches)
  rows = np.full(count * batch_size, mine[0] if len(mine) else 0)
  used = min(len(mine), len(rows))
  rows[:used] = mine[:used]
  weights = (np.arange(len(rows)) < used).astype(np.float32)
  return [_batch(encode, [split.texts[i] for i in rows[s:s + batch_size]],
                 split.labels[rows[s:s + batch_size]], weights[s:s + batch_size])
          for s in range(0, len(rows), batch_size)]


def label_counts(split: Split, num_classes: int) -> np.ndarray:
  """int64[C]: examples per class, e.g. for the majority-class baseline of a report."""
  return np.bincount(split.labels, minlength=num_classes)


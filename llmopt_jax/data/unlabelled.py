"""Unlabelled text beside the labelled training batches: for consistency training (UDA) and
for a distillation's transfer set.

Semi-supervised methods read text without labels next to the labelled examples: UDA (Xie et
al., 2019) asks the model to predict the same for an unlabelled text and for an augmented
copy of it; a distillation's transfer set (TinyBERT, Jiao et al., 2020) lets the teacher label
text the student has no labels for. The text is the rest of a few-shot split ('rest', kept by
`few_shot.py`) or a file of the user's (`read_texts`).

`UnlabelledBatches` walks the texts as `ClassificationBatches` walks labelled examples: epoch
after epoch, in a permutation drawn from (seed, epoch) on a stream of its own, data shard s of
n taking every n-th row, so its position is again (epoch, position). With an `Augmenter` each
row also comes as its augmented view, edited as a function of (seed, epoch, text, copy 1), so
the position still fixes every batch. `WithUnlabelled` pairs one shard's labelled batches with
its unlabelled ones and carries both positions in one state, so a checkpoint resumes both.

Keys added to a training batch (u = unlabelled rows of this shard, T = seq_len):
  unlabelled_tokens        int32[u, T]  the clean text
  unlabelled_padding_mask  bool[u, T]
  unlabelled_token_types   int32[u, T]
  unlabelled_index         int32[u]     the rows' ids among the unlabelled texts
  augmented_tokens         int32[u, T]  with an augmenter only: the same rows, augmented
  augmented_padding_mask   bool[u, T]
  augmented_token_types    int32[u, T]
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os

import numpy as np

from llmopt_jax.data import lm_pipeline, utf8
from llmopt_jax.data.augment.config import AugmentConfig
from llmopt_jax.data.augment.pipeline import Augmenter
from llmopt_jax.data.classification import Batch, Encode
from llmopt_jax.data.labelled import Split

CLEAN, AUGMENTED = 'unlabelled_', 'augmented_'  # key prefixes of the two views
MODEL_INPUTS = ('tokens', 'padding_mask', 'token_types')
# Mixed into the epoch orders' seeds, so the unlabelled order never repeats the labelled one
# (drawn from [seed, epoch]) when the two sets have the same size.
_STREAM = 0x554E4C42  # 'UNLB'


@dataclasses.dataclass(frozen=True)
class UnlabelledConfig:
  """Where a run's unlabelled rows come from and how many ride in each step, checked."""
  source: str            # 'rest' or a file of texts
  batch_size: int        # rows per step, all processes together; a multiple of the labelled
  ratio: int             # batch_size / the labelled batch size, so every shard gets its share
  augment: AugmentConfig  # the augmented view's edits; disabled = the clean view only
  field: str             # the config field that names `source`, for errors

  @classmethod
  def check(cls, source: str, batch_size: int, augment: AugmentConfig, *, labelled_batch: int,
            shots: int, field: str, size_field: str) -> UnlabelledConfig:
    """From the fields `field` (the source) and `size_field` (rows per step); `shots` is
    config.data.shots_per_class, without which there is no rest."""
    if not isinstance(source, str) or not source:
      raise ValueError(f"{field}={source!r}: give 'rest' (the few-shot split's unlabelled "
                       f"rest) or a .txt/.csv/.tsv/.jsonl file of texts")
    if source == 'rest' and not shots:
      raise ValueError(f"{field}='rest' needs config.data.shots_per_class > 0: without a "
                       f"few-shot cut the training split has no unlabelled rest")
    if source != 'rest':
      _check_file(source, f'{field}={source!r}')
    if (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        or batch_size % labelled_batch):
      raise ValueError(f'{size_field}={batch_size!r} must be a positive multiple of '
                       f'config.train.batch_size={labelled_batch} (each data shard reads its '
                       f'share of both)')
    return cls(source, batch_size, batch_size // labelled_batch, augment, field)

  def texts(self, rest: Split | None, text_field: str) -> tuple[str, ...]:
    """The unlabelled texts: `rest` (the few-shot cut's remainder) or the file's."""
    if self.source != 'rest':
      return read_texts(self.source, text_field, self.field)
    if rest is None or not len(rest):
      raise ValueError(f"{self.field}='rest': the few-shot cut left no training example "
                       f"unlabelled (every class has at most config.data.shots_per_class)")
    return rest.texts


def view(batch: dict, prefix: str) -> dict:
  """The model inputs of one view of a batch's unlabelled rows, under their plain names
  ('tokens', 'padding_mask', 'token_types'), to feed a classifier as a batch of its own."""
  return {key: batch[prefix + key] for key in MODEL_INPUTS}


def read_texts(path: str, text_field: str, field: str) -> tuple[str, ...]:
  """The texts of a file: .txt (one per non-blank line), or the column `text_field` of a
  .csv/.tsv with a header or of a .jsonl; `field` names the config field for errors."""
  where = f'{field}={path!r}'
  ext = _check_file(path, where)
  content = utf8.read_text(path)
  if ext == '.txt':
    texts = content.splitlines()
  elif ext in ('.csv', '.tsv'):
    texts = _column(content, ',' if ext == '.csv' else '\t', text_field, where)
  else:
    texts = [_json_text(line, raw, text_field, where)
             for line, raw in enumerate(content.split('\n'), 1) if raw.strip()]
  texts = tuple(t.strip() for t in texts if t.strip())
  if not texts:
    raise ValueError(f'{where}: the file holds no texts')
  return texts


def _check_file(path: str, where: str) -> str:
  """The extension of a file of texts that exists and has a known format."""
  if not os.path.isfile(path):
    raise ValueError(f'{where}: no such file (a .txt, .csv, .tsv or .jsonl of texts, or '
                     f"'rest' for the training split's unlabelled rest)")
  ext = os.path.splitext(path)[1].lower()
  if ext not in ('.txt', '.csv', '.tsv', '.jsonl', '.ndjson'):
    raise ValueError(f'{where}: unknown format {ext!r}; use .txt, .csv, .tsv or .jsonl')
  return ext


def _column(content: str, delimiter: str, text_field: str, where: str) -> list[str]:
  try:
    reader = csv.DictReader(io.StringIO(content, newline=''), delimiter=delimiter, strict=True)
    if text_field not in (reader.fieldnames or ()):
      raise ValueError(f'{where}: no column {text_field!r} (config.data.text_field); '
                       f'available: {reader.fieldnames}')
    return [row[text_field] or '' for row in reader]
  except csv.Error as e:
    raise ValueError(f'{where}: bad CSV ({e})') from None


def _json_text(line: int, raw: str, text_field: str, where: str) -> str:
  try:
    record = json.loads(raw)
  except json.JSONDecodeError as e:
    raise ValueError(f'{where}, line {line}: not JSON ({e.msg})') from None
  if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
    raise ValueError(f'{where}, line {line}: needs an object with a text in '  # noqa: TRY004
                     f'{text_field!r} (config.data.text_field)')
  return record[text_field]


def _encoded(encode: Encode, texts: list[str], prefix: str) -> Batch:
  ids, mask, types = encode(texts)
  if not ids.shape == mask.shape == types.shape or ids.shape[0] != len(texts):
    raise ValueError(f'encode returned ids {ids.shape}, mask {mask.shape}, token_types '
                     f'{types.shape} for {len(texts)} texts; all must be [n, T]')
  return {prefix + 'tokens': np.asarray(ids, np.int32),
          prefix + 'padding_mask': np.asarray(mask, bool),
          prefix + 'token_types': np.asarray(types, np.int32)}


class UnlabelledBatches:
  """Iterator of one data shard's unlabelled rows (see the module docstring for keys)."""

  def __init__(self, texts: tuple[str, ...], encode: Encode, *, batch_size: int, seed: int,
               shard_index: int = 0, shard_count: int = 1, augment: Augmenter | None = None,
               state: dict[str, int] | None = None):
    lm_pipeline.check_shard(batch_size, shard_index, shard_count, len(texts), 'unlabelled texts')
    self._texts, self._encode, self._augment = texts, encode, augment
    self._batch_size, self._seed = batch_size, seed
    self._shard_index, self._shard_count = shard_index, shard_count
    self._orders: dict[int, np.ndarray] = {}
    self.set_state(state or {'epoch': 0, 'position': 0})

  def __iter__(self) -> UnlabelledBatches:
    return self

  def __next__(self) -> Batch:
    rows, epochs, needed = [], [], self._batch_size
    while needed:
      order = self._order(self._epoch)
      rows.append(order[self._position:self._position + needed])
      epochs.append(np.full(len(rows[-1]), self._epoch))
      needed -= len(rows[-1])
      self._position += len(rows[-1])
      if self._position == len(order):  # An epoch may end inside a batch; go on to the next.
        self._epoch, self._position = self._epoch + 1, 0
    picked, epochs = np.concatenate(rows), np.concatenate(epochs)
    texts = [self._texts[i] for i in picked]
    batch = _encoded(self._encode, texts, CLEAN)
    batch[CLEAN + 'index'] = picked.astype(np.int32)
    if self._augment is not None:
      edited = [self._augment(text, int(epoch), int(i), 1)
                for text, epoch, i in zip(texts, epochs, picked)]
      batch.update(_encoded(self._encode, edited, AUGMENTED))
    return batch

  def get_state(self) -> dict[str, int]:
    """Where the next row starts: JSON-ready ints."""
    return {'epoch': self._epoch, 'position': self._position}

  def set_state(self, state: dict[str, int]) -> None:
    if missing := {'epoch', 'position'} - set(state):
      raise ValueError(f'unlabelled data state {state} lacks {sorted(missing)}')
    epoch, position = int(state['epoch']), int(state['position'])
    if epoch < 0 or not 0 <= position < len(self._order(epoch)):
      raise ValueError(f'unlabelled data state {state} points outside epoch {epoch} of this '
                       f'shard')
    self._epoch, self._position = epoch, position

  def _order(self, epoch: int) -> np.ndarray:
    """This shard's text ids for `epoch`, in reading order."""
    if epoch not in self._orders:
      order = np.random.default_rng([_STREAM, self._seed, epoch]).permutation(len(self._texts))
      self._orders = {epoch: order[self._shard_index::self._shard_count]}  # Keep one epoch.
    return self._orders[epoch]


class WithUnlabelled:
  """One shard's labelled batches with its unlabelled rows added; one state for both.

  The state is the labelled iterator's own, plus the unlabelled position under 'unlabelled',
  so the labelled part of a checkpoint reads as it did without unlabelled text.
  """

  def __init__(self, labelled, unlabelled: UnlabelledBatches):
    self._labelled, self._unlabelled = labelled, unlabelled

  def __iter__(self) -> WithUnlabelled:
    return self

  def __next__(self) -> Batch:
    return {**next(self._labelled), **next(self._unlabelled)}

  def get_state(self) -> dict:
    return {**self._labelled.get_state(), 'unlabelled': self._unlabelled.get_state()}

  def set_state(self, state: dict) -> None:
    if 'unlabelled' not in state:
      raise ValueError('the checkpoint holds no position in the unlabelled text (written by a '
                       'run without consistency training or a transfer set); resume it with '
                       'the config it was started with')
    self._labelled.set_state({k: v for k, v in state.items() if k != 'unlabelled'})
    self._unlabelled.set_state(state['unlabelled'])

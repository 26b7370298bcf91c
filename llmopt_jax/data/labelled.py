"""Labelled text sets for classification: splits, a stratified carve-out, and users' files.

A data set is held in memory as texts and int32 label ids per split, with the label names
that give the ids their meaning. Sets the size of Banking77 or CLINC150 (tens of thousands
of short queries) take a few MB, so nothing here streams.

A user's own file is CSV, TSV or JSON Lines (one object per line), chosen by its extension:

    config.data.path=/data/tickets.csv  config.data.text_field=body  config.data.label_field=queue

Label ids come from the train file alone (sorted names, numerically when every name is an
integer), so the head's size never depends on what the evaluation files contain; a label met
only in a validation or test file is an error rather than a class the model cannot predict.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

# A carve-out uses this seed unless told otherwise: it is not the run's seed, so that runs
# with different seeds (a sweep, a seed study) are all selected on the same validation set.
VALIDATION_SEED = 0


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: `texts[i]` has label id `labels[i]`."""
  texts: tuple[str, ...]
  labels: np.ndarray  # int32[n]

  def __len__(self) -> int:
    return len(self.texts)


@dataclasses.dataclass(frozen=True)
class LabelledSplits:
  """A classification data set: its splits, label names, and how validation was made."""
  name: str
  splits: dict[str, Split]  # 'train', 'validation' and, where the set has one, 'test'
  label_names: tuple[str, ...]  # label id -> name
  validation_note: str  # e.g. 'the file's own val split' or '10% of train, stratified ...'

  @property
  def num_classes(self) -> int:
    return len(self.label_names)

  def __getitem__(self, split: str) -> Split:
    if split not in self.splits:
      raise ValueError(f'{self.name} has no split {split!r}; available: {sorted(self.splits)}')
    return self.splits[split]

  def metadata(self) -> dict:
    """JSON-ready facts about the set, for the run's log and summary."""
    return {'name': self.name, 'num_classes': self.num_classes,
            'sizes': {name: len(split) for name, split in self.splits.items()},
            'validation': self.validation_note}


def encode_labels(names: Sequence[str], label_names: Sequence[str], where: str) -> np.ndarray:
  """int32 ids of label `names`; an unknown name is an error that names it and `where`."""
  ids = {name: i for i, name in enumerate(label_names)}
  for name in names:
    if name not in ids:
      raise ValueError(f'label {name!r} in {where} is not a label of the train split '
                       f'({len(ids)} labels, e.g. {sorted(ids)[:5]})')
  return np.array([ids[name] for name in names], np.int32)


def carve_validation(train: Split, fraction: float, seed: int = VALIDATION_SEED
                     ) -> tuple[Split, Split, str]:
  """(train, validation, note): `fraction` of each class moved from train to validation.

  Stratified, so validation has train's label mix and every class with at least
  1 / (2 * fraction) examples is in it; class c gives round(fraction * n_c) examples, picked by
  a permutation drawn from (seed, c). Both parts keep the file's order, so the split depends
  only on the data, the fraction and the seed.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f'validation fraction {fraction} must lie strictly between 0 and 1')
  held = np.zeros(len(train), bool)
  for c in np.unique(train.labels):
    members = np.flatnonzero(train.labels == c)
    count = int(fraction * len(members) + 0.5)
    chosen = np.random.default_rng([seed, int(c)]).permutation(members)[:count]
    held[chosen] = True
  if not held.any() or held.all():
    raise ValueError(f'a {fraction * 100:g}% validation carve-out of {len(train)} examples leaves '
                     'one side empty; give a validation file or another fraction')
  note = (f'{fraction * 100:g}% of each class of the train file, stratified, seed {seed} '
          f'({int(held.sum())} examples); the rest is train')

  def part(mask: np.ndarray) -> Split:
    return Split(tuple(t for t, keep in zip(train.texts, mask) if keep), train.labels[mask])
  return part(~held), part(held), note


def read_rows(path: str, text_field: str, label_field: str) -> list[tuple[str, str]]:
  """(text, label name) rows of a CSV, TSV or JSONL file; texts are stripped of outer space.

  Fails with one line naming the file and the problem: missing or empty file, unknown format,
  a missing column (with the columns there are), or a row without a value.
  """
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f'classification data file {path!r} does not exist')
  ext = os.path.splitext(path)[1].lower()
  if ext in ('.csv', '.tsv'):
    records = _delimited(path, ',' if ext == '.csv' else '\t', (text_field, label_field))
  elif ext in ('.jsonl', '.ndjson'):
    records = _json_lines(path, (text_field, label_field))
  else:
    raise ValueError(f'{path}: unknown format {ext!r}; use .csv, .tsv or .jsonl')
  rows = []
  for line, record in records:
    text, label = record.get(text_field), record.get(label_field)
    for field, value in ((text_field, text), (label_field, label)):
      if value is None:
        raise ValueError(f'{path}, line {line}: no value in column {field!r}')
    rows.append((str(text).strip(), str(label).strip()))
  if not rows:
    raise ValueError(f'{path} holds no examples')
  return rows


def _delimited(path: str, delimiter: str, fields: tuple[str, str]):
  """(line number, row dict) of a CSV/TSV file with a header, checking the header first."""
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.DictReader(f, delimiter=delimiter)
    columns = reader.fieldnames
    if not columns:
      raise ValueError(f'{path} is empty (no header row)')
    for field in fields:
      if field not in columns:
        raise ValueError(f'column {field!r} is not in {path}; available: {list(columns)}')
    # A physical line count would be wrong for quoted texts spanning lines; the reader knows.
    return [(reader.line_num, row) for row in reader]


def _json_lines(path: str, fields: tuple[str, str]):
  """(line number, object) of a JSON Lines file; blank lines are skipped."""
  records = []
  with open(path, encoding='utf-8-sig') as f:
    for line, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        record = json.loads(raw)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}, line {line}: not JSON ({e.msg})') from e
      if not isinstance(record, dict):
        raise ValueError(f'{path}, line {line}: a JSON object is needed, got '
                         f'{type(record).__name__}')
      for field in fields:
        if field not in record:
          raise ValueError(f'column {field!r} is not in {path} (line {line}); '
                           f'available: {sorted(record)}')
      records.append((line, record))
  return records


def _sorted_names(names: set[str]) -> tuple[str, ...]:
  """Label names in a stable order: numeric when all are integers (so '10' follows '9')."""
  if all(_is_int(n) for n in names):
    return tuple(sorted(names, key=int))
  return tuple(sorted(names))


def _is_int(name: str) -> bool:
  try:
    int(name)
  except ValueError:
    return False
  return True


def load_file(path: str, *, text_field: str = 'text', label_field: str = 'label',
              validation_path: str = '', test_path: str = '', validation_fraction: float = 0.1,
              validation_seed: int = VALIDATION_SEED) -> LabelledSplits:
  """A user's labelled set: train from `path`, validation from its file or carved out of train.

  Without `validation_path`, `validation_fraction` of train (stratified, see
  `carve_validation`) becomes validation. `test_path` is optional; without it the set has no
  'test' split.
  """
  rows = read_rows(path, text_field, label_field)
  label_names = _sorted_names({label for _, label in rows})

  def split_of(rows: list[tuple[str, str]], where: str) -> Split:
    texts, names = zip(*rows)
    return Split(tuple(texts), encode_labels(names, label_names, where))

  train = split_of(rows, path)
  if validation_path:
    validation = split_of(read_rows(validation_path, text_field, label_field), validation_path)
    note = f'the validation file {validation_path}'
  else:
    train, validation, note = carve_validation(train, validation_fraction, validation_seed)
  splits = {'train': train, 'validation': validation}
  if test_path:
    splits['test'] = split_of(read_rows(test_path, text_field, label_field), test_path)
  return LabelledSplits(os.path.basename(path), splits, label_names, note)

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
import io
import json
import os
import re
from collections.abc import Sequence

import numpy as np

from llmopt_jax.data import utf8

# A carve-out uses this seed unless told otherwise: it is not the run's seed, so that runs
# with different seeds (a sweep, a seed study) are all selected on the same validation set.
VALIDATION_SEED = 0

_LINE_BREAK = re.compile(r'\r\n|\r|\n')


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
  train_note: str = ''  # how train was cut from the file's, e.g. a few-shot subset; '' = not

  @property
  def num_classes(self) -> int:
    return len(self.label_names)

  def __getitem__(self, split: str) -> Split:
    if split not in self.splits:
      raise ValueError(f'{self.name} has no split {split!r}; available: {sorted(self.splits)}')
    return self.splits[split]

  def metadata(self) -> dict:
    """JSON-ready facts about the set, for the run's log and summary."""
    facts = {'name': self.name, 'num_classes': self.num_classes,
             'sizes': {name: len(split) for name, split in self.splits.items()},
             'validation': self.validation_note}
    return {**facts, 'train': self.train_note} if self.train_note else facts


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
  """(text, label name) rows of a CSV, TSV or JSONL file; both are stripped of outer space.

  The parse is strict, because a silently misread row trains on the wrong data: a file that is
  not UTF-8, a CSV quoting error, a row with the wrong number of fields, a quote that swallows
  the rows after it (`_swallowed_label`), a line that is not a JSON object, an empty text or
  label each fail with one line naming the file and the line of the row.
  """
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f'classification data file {path!r} does not exist')
  ext = os.path.splitext(path)[1].lower()
  if ext not in ('.csv', '.tsv', '.jsonl', '.ndjson'):
    raise ValueError(f'{path}: unknown format {ext!r}; use .csv, .tsv or .jsonl')
  content = utf8.read_text(path)
  if ext in ('.csv', '.tsv'):
    records = _delimited(path, content, ',' if ext == '.csv' else '\t', text_field, label_field)
  else:
    records = _json_lines(path, content, (text_field, label_field))
  rows = []
  for line, text, label in records:
    for field, value in ((text_field, text), (label_field, label)):
      if not value.strip():
        raise ValueError(f'{path}, line {line}: empty value in column {field!r}')
    if _LINE_BREAK.search(label):
      raise ValueError(f'{path}, line {line}: the label {label!r} in column {label_field!r} '
                       'spans lines; is a quote left open?')
    rows.append((text.strip(), label.strip()))
  if not rows:
    raise ValueError(f'{path} holds no examples')
  return rows


def _delimited(path: str, content: str, delimiter: str, text_field: str, label_field: str
               ) -> list[tuple[int, str, str]]:
  """(first line, text, label) of each row of a CSV/TSV file with a header, parsed strictly.

  Line numbers are physical lines (the csv reader's count), so a row after a quoted
  multi-line text is still named by the line an editor shows it on.
  """
  reader = csv.reader(io.StringIO(content, newline=''), delimiter=delimiter, strict=True)
  records = []  # (first line, last line, cells)
  start = 1
  try:
    header = next(reader, None)
    text_col, label_col = _columns(path, header, (text_field, label_field))
    start = reader.line_num + 1
    for cells in reader:
      if cells and len(cells) != len(header):  # the reader gives [] for a blank line
        spans = (f'; the row runs on to line {reader.line_num}: is a quote on line {start} left '
                 'open?') if reader.line_num > start else ''
        raise ValueError(f'{path}, line {start}: {len(cells)} fields where the header has '
                         f'{len(header)} ({header}){spans}')
      if cells:
        records.append((start, reader.line_num, cells))
      start = reader.line_num + 1
  except csv.Error as e:
    raise ValueError(_quoting_error(path, start, reader.line_num, e)) from e
  # Only now is every label known, which tells a swallowed row from a multi-line text.
  labels = {cells[label_col].strip() for _, _, cells in records} - {''}
  for first, last, cells in records:
    swallowed = last > first and _swallowed_label(cells, label_col, delimiter, labels)
    if swallowed:
      raise ValueError(
          f'{path}, line {first}: a quoted field runs on to line {last} and holds what looks '
          f'like a whole row (label {swallowed!r}); is a quote on line {first} left open? '
          'A quote inside a field must be doubled ("")')
  return [(first, cells[text_col], cells[label_col]) for first, _, cells in records]


def _columns(path: str, header: list[str] | None, fields: tuple[str, ...]) -> list[int]:
  """The position of each of `fields` in a CSV/TSV `header`."""
  if not header:
    raise ValueError(f'{path} is empty (no header row)')
  for field in fields:
    if field not in header:
      raise ValueError(f'column {field!r} is not in {path}; available: {header}')
    if header.count(field) > 1:
      raise ValueError(f'{path}: column {field!r} appears {header.count(field)} times in the '
                       'header')
  return [header.index(field) for field in fields]


def _quoting_error(path: str, start: int, end: int, error: csv.Error) -> str:
  """One line for a CSV syntax error in the row starting on line `start`."""
  if 'unexpected end of data' in str(error):
    return (f'{path}, line {start}: a quote opened in this row is never closed (the field runs '
            'to the end of the file)')
  where = f' (the row runs on to line {end})' if end > start else ''
  return (f'{path}, line {start}: bad quoting: {error}{where}; a quoted field must be closed '
          'just before a delimiter or the end of its line, and a quote inside it doubled ("")')


def _swallowed_label(cells: list[str], label_col: int, delimiter: str,
                     labels: set[str]) -> str | None:
  """A known label found in a multi-line field where a row swallowed by an open quote has it.

  A quote left open in field i of row r runs to the next quote that is followed by a
  delimiter or a line end, so the field holds, line by line: the rest of row r (its fields
  after i, label included when label_col > i), whole rows (every field), and the start of the
  row where the quote closes (its fields before i, label included when label_col < i). A
  legitimately quoted multi-line text is flagged only if one of its lines splits the same way
  with one of the file's labels exactly in the label's place.
  """
  width = len(cells)
  for i, cell in enumerate(cells):
    lines = _LINE_BREAK.split(cell)
    if len(lines) == 1 or i == label_col:
      continue
    candidates = [parts[label_col] for parts in (line.split(delimiter) for line in lines[1:-1])
                  if len(parts) == width]
    first, last = lines[0].split(delimiter), lines[-1].split(delimiter)
    if label_col > i and len(first) >= width - i:
      candidates.append(first[label_col - width])
    if label_col < i and len(last) > i:
      candidates.append(last[label_col])
    for candidate in candidates:
      if candidate.strip() in labels:
        return candidate.strip()
  return None


def _json_lines(path: str, content: str, fields: tuple[str, str]) -> list[tuple[int, str, str]]:
  """(line, text, label) of a JSON Lines file; blank lines are skipped."""
  records = []
  for line, raw in enumerate(content.split('\n'), 1):
    if not raw.strip():
      continue
    try:
      record = json.loads(raw)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}, line {line}: not JSON ({e.msg}, column {e.colno})') from e
    if not isinstance(record, dict):
      raise ValueError(f'{path}, line {line}: a JSON object is needed, got '
                       f'{type(record).__name__}')
    values = []
    for field in fields:
      if field not in record:
        raise ValueError(f'column {field!r} is not in {path} (line {line}); '
                         f'available: {sorted(record)}')
      value = record[field]
      if value is None or isinstance(value, (dict, list)):
        raise ValueError(f'{path}, line {line}: column {field!r} holds '
                         f'{json.dumps(value)[:40]}, not a text or a label')
      values.append(str(value))
    records.append((line, *values))
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

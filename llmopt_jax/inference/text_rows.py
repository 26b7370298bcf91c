"""The texts of a CSV, TSV or JSON Lines file, streamed a row at a time and parsed strictly.

The reader of labelled training files (`data/labelled.py`) holds a whole file and needs a
label in every row; a file to classify may be far larger than memory and has no labels. This
reader keeps its strictness (UTF-8 only, a CSV quoting error or a row with the wrong number of
fields, a line that is not a JSON object, a missing or empty text: one line naming the file
and the line) but reads the file line by line, so any size streams in constant memory.

Texts are stripped of outer white space, as the fine-tunes' readers strip them.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
from collections.abc import Iterator

FORMATS = ('csv', 'tsv', 'jsonl')
_EXTENSIONS = {'.csv': 'csv', '.tsv': 'tsv', '.jsonl': 'jsonl', '.ndjson': 'jsonl'}
FIELD = 'config.data.text_field'


def file_format(path: str, name: str = 'auto') -> str:
  """`name`, or for 'auto' the format of `path`'s extension; a one-line error otherwise."""
  if name == 'auto':
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
      raise ValueError(f'config.data.format=auto: cannot tell the format of {path} from its '
                       f'extension {ext!r}; use .csv, .tsv or .jsonl, or set config.data.format '
                       f'to one of {FORMATS}')
    return _EXTENSIONS[ext]
  if name not in FORMATS:
    raise ValueError(f'config.data.format={name!r}; choose from {("auto", *FORMATS)}')
  return name


def read_texts(path: str, fmt: str, text_field: str) -> Iterator[str]:
  """The text of every row of the file, in file order."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config.data.path={path!r}: no such file')
  rows = (_json_lines(path, text_field) if fmt == 'jsonl' else
          _delimited(path, ',' if fmt == 'csv' else '\t', text_field))
  for line, text in rows:
    if not text.strip():
      raise ValueError(f'{path}, line {line}: empty text in column {text_field!r} ({FIELD})')
    yield text.strip()


def _lines(path: str) -> Iterator[str]:
  """The file's lines (with their line ends), each decoded as UTF-8 strictly."""
  with open(path, 'rb') as f:
    for number, raw in enumerate(f, 1):
      if number == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise ValueError(f'{path}, line {number}: not UTF-8 text (byte 0x{raw[e.start]:02x} '
                         f'at column {e.start + 1}); save the file as UTF-8') from None
      if '\0' in line:
        raise ValueError(f'{path}, line {number}: byte 0x00 is not text; a binary or UTF-16 '
                         f'file? save it as UTF-8 text')
      yield line


def _delimited(path: str, delimiter: str, text_field: str) -> Iterator[tuple[int, str]]:
  """(first line, text) of each row of a CSV/TSV file with a header row."""
  reader = csv.reader(_lines(path), delimiter=delimiter, strict=True)
  start = 1
  try:
    header = next(reader, None)
    if not header:
      raise ValueError(f'{path} is empty (no header row)')
    if text_field not in header:
      raise ValueError(f'column {text_field!r} ({FIELD}) is not in {path}; available: {header}')
    column = header.index(text_field)
    start = reader.line_num + 1
    for cells in reader:
      if cells and len(cells) != len(header):  # the reader gives [] for a blank line
        runs_on = (f'; the row runs on to line {reader.line_num}: is a quote on line {start} '
                   f'left open?') if reader.line_num > start else ''
        raise ValueError(f'{path}, line {start}: {len(cells)} fields where the header has '
                         f'{len(header)}{runs_on}')
      if cells:
        yield start, cells[column]
      start = reader.line_num + 1
  except csv.Error as e:
    if 'unexpected end of data' in str(e):
      raise ValueError(f'{path}, line {start}: a quote opened in this row is never closed '
                       f'(the field runs to the end of the file)') from None
    raise ValueError(f'{path}, line {start}: bad quoting: {e}; a quote inside a field must be '
                     f'doubled ("")') from None


def _json_lines(path: str, text_field: str) -> Iterator[tuple[int, str]]:
  """(line, text) of each JSON object of a JSON Lines file; blank lines are skipped."""
  for number, raw in enumerate(_lines(path), 1):
    if not raw.strip():
      continue
    try:
      record = json.loads(raw)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}, line {number}: not JSON ({e.msg}, column {e.colno})') from None
    # A wrong type in the file is bad input, which main.py reports (as ValueError) in one line.
    if not isinstance(record, dict):
      raise ValueError(f'{path}, line {number}: a JSON object is needed, got '  # noqa: TRY004
                       f'{type(record).__name__}')
    if text_field not in record:
      raise ValueError(f'{path}, line {number}: no field {text_field!r} ({FIELD}); it has '
                       f'{sorted(record)}')
    value = record[text_field]
    if not isinstance(value, str):
      raise ValueError(f'{path}, line {number}: field {text_field!r} holds '  # noqa: TRY004
                       f'{json.dumps(value)[:40]}, not a text')
    yield number, value

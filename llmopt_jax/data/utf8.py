"""Users' text files decoded strictly, failing at the first bad byte with its offset.

Python's own decoding error is a traceback that names neither the file nor the line. A user
who saved a corpus as Latin-1 or UTF-16, or pointed the config at a binary file, should see
one line that says which file and where: the byte offset (for `cmp`, `xxd -s`) and the line.
"""

from __future__ import annotations

import codecs
import os

_BOM = codecs.BOM_UTF8


def read_text(path: str | os.PathLike) -> str:
  """The contents of the file at `path` as UTF-8 text (see `decode`)."""
  with open(path, 'rb') as f:
    return decode(f.read(), path)


def decode(data: bytes, path: str | os.PathLike) -> str:
  """`data` as UTF-8 (a leading byte-order mark dropped); a ValueError naming `path` otherwise.

  NUL is valid UTF-8 but never appears in text: it marks a binary file, or UTF-16, whose
  ASCII characters would otherwise decode 'successfully' with a NUL after each of them.
  """
  start = len(_BOM) if data.startswith(_BOM) else 0
  try:
    text = data[start:].decode('utf-8')
  except UnicodeDecodeError as e:
    offset = start + e.start
    raise ValueError(f'{path}: not UTF-8 text: byte 0x{data[offset]:02x} at offset {offset} '
                     f'(line {_line(data, offset)}); save the file as UTF-8') from e
  nul = data.find(b'\0')
  if nul >= 0:
    raise ValueError(f'{path}: byte 0x00 at offset {nul} (line {_line(data, nul)}) '
                     'is not text; a binary or UTF-16 file? save it as UTF-8 text')
  return text


def _line(data: bytes, offset: int) -> int:
  """The 1-based line of the byte at `offset`."""
  return data.count(b'\n', 0, offset) + 1

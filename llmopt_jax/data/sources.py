"""Text sources: the documents of one split as a random-access sequence of `str`.

Random access (rather than a stream) is what makes the input pipeline exact to resume and
cheap to shard: a position is a few integers, and each process reads only its documents.
TFDS provides it through ArrayRecord files, without TensorFlow.

Shipped corpora are prepared from the repository on first use; public TFDS sets must be
prepared by the user once, in ArrayRecord format:

    tfds build lm1b --file_format=array_record --data_dir=$TFDS_DATA_DIR

A user's own plain-text file needs no preparation: name `text_file` and give its `path`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import tensorflow_datasets as tfds

from etils import epath

from llmopt_jax.data.tiny_shakespeare import TinyShakespeare, builder as shakespeare

# Corpora that ship with the repository, by the name configs use.
SHIPPED_BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    'tiny_shakespeare': TinyShakespeare,
}


class TextSource(Protocol):
  """A split: `len(source)` documents, `source[i]` the text of document i."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> str: ...


class ListSource:
  """A TextSource over texts already in memory (tests, small user corpora)."""

  def __init__(self, texts: Sequence[str]):
    self._texts = list(texts)

  def __len__(self) -> int:
    return len(self._texts)

  def __getitem__(self, index: int) -> str:
    return self._texts[index]


class TfdsTextSource:
  """One text feature of a TFDS random-access data source, decoded from UTF-8 bytes."""

  def __init__(self, data: Sequence[dict[str, Any]], text_field: str):
    self._data = data
    self._field = text_field

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> str:
    value = self._data[index][self._field]
    return value.decode('utf-8') if isinstance(value, bytes) else str(value)


# The dataset name that reads a local plain-text file instead of a TFDS set.
TEXT_FILE = 'text_file'


def load_text_source(name: str, split: str, *, data_dir: str | None,
                     text_field: str = 'text', path: str = '') -> TextSource:
  """The documents of `split` of dataset `name` (data_dir None: TFDS' default, TFDS_DATA_DIR).

  Every problem (unknown or unprepared dataset, unknown split or field, empty split) is a
  one-line error naming what to change.
  """
  if name == TEXT_FILE:
    return load_text_file(path, split)
  if name in SHIPPED_BUILDERS:
    builder = _prepare_shipped(SHIPPED_BUILDERS[name], data_dir)
  else:
    builder = _prepared_public(name, data_dir)
  _check_split(builder, name, split)
  features = builder.info.features
  if text_field not in features.keys():
    raise ValueError(f'config.data.text_field={text_field!r} is not a feature of {name}; '
                     f'available: {sorted(features.keys())}')
  try:
    data = builder.as_data_source(split)
  except NotImplementedError as e:  # Prepared, but not in a random-access format.
    raise ValueError(f'{name} in {builder.data_dir} is not in ArrayRecord format; '
                     f'{_build_command(name, data_dir)}') from e
  source = TfdsTextSource(data, text_field)
  _check_not_empty(source, name, split)
  return source


def _prepare_shipped(builder_cls: type[tfds.core.GeneratorBasedBuilder],
                     data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The builder, with its splits written to data_dir unless they are there already."""
  builder = builder_cls(data_dir=data_dir, file_format='array_record')
  if builder.is_prepared():
    return builder
  try:
    builder.download_and_prepare()
  except OSError:
    # Processes sharing a data_dir may prepare at the same time; TFDS writes each copy to its
    # own temporary folder, so losing the final rename means an identical copy is in place.
    builder = builder_cls(data_dir=data_dir, file_format='array_record')
    if not builder.is_prepared():
      raise
  return builder


def _prepared_public(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The catalogue builder of `name`, which the user must have prepared beforehand."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'unknown dataset {name!r}: neither shipped '
                     f'({sorted(SHIPPED_BUILDERS)}) nor in the TFDS catalogue') from e
  if not builder.is_prepared():
    raise FileNotFoundError(f'dataset {name} is not prepared at {builder.data_dir}; '
                            f'{_build_command(name, data_dir)}')
  return builder


def _build_command(name: str, data_dir: str | None) -> str:
  where = f' --data_dir={data_dir}' if data_dir else ''
  return f'prepare it with: tfds build {name} --file_format=array_record{where}'


def _check_split(builder: tfds.core.DatasetBuilder, name: str, split: str) -> None:
  """Checks every split named in `split`, which may use TFDS syntax like 'train[:10%]+test'."""
  available = sorted(builder.info.splits.keys())
  for part in split.split('+'):
    base = part.split('[')[0].strip()
    if base not in available:
      raise ValueError(f'{name} has no split {base!r}; available: {available}')


def _check_not_empty(source: TextSource, name: str, split: str) -> None:
  # Stops at the first non-empty document, so a real corpus costs one read.
  if not any(source[i] for i in range(len(source))):
    contents = f'{len(source)} documents, all empty' if len(source) else 'no documents'
    raise ValueError(f'split {split!r} of {name} has no text ({contents})')


def load_text_file(path: str, split: str) -> ListSource:
  """A local plain-text corpus split the way tiny Shakespeare is.

  Documents are the blocks between blank lines; 'train' holds those in the first ~90% of the
  characters and 'validation' the rest.
  """
  if not path:
    raise ValueError(f"config.data.path must name a text file when config.data.name='{TEXT_FILE}'")
  documents = shakespeare.read_speeches(epath.Path(path))
  cut = shakespeare.split_index(documents)
  splits = {'train': documents[:cut], 'validation': documents[cut:]}
  if split not in splits:
    raise ValueError(f'{TEXT_FILE} has no split {split!r}; available: {sorted(splits)}')
  source = ListSource(splits[split])
  _check_not_empty(source, path, split)
  return source

"""The shipped intent-classification sets, Banking77 and CLINC150, and loading by name.

  banking77   online-banking customer queries, 77 intents (Casanueva et al., 2020, "Efficient
              Intent Detection with Dual Sentence Encoders"). Upstream has train and test only;
              validation is carved out of train here (`labelled.carve_validation`: 10% of
              each intent, stratified, fixed seed), so test stays the published test set.
  clinc150    virtual-assistant queries, 150 intents in 10 domains plus out-of-scope queries
              (Larson et al., 2019, "An Evaluation Dataset for Intent Classification and
              Out-of-Scope Prediction"). The "full" variant, with its own train/val/test; as in
              the paper's full setting every split includes its out-of-scope queries, as one
              more class `oos` with the last id (150).

Both are copied byte for byte into this package, with their sources and licenses in each
folder's PROVENANCE.md. Any other name is a user's file (`labelled.load_file`).
"""

from __future__ import annotations

import json
import os

from llmopt_jax.data import labelled
from llmopt_jax.data.labelled import LabelledSplits, Split

HERE = os.path.dirname(os.path.abspath(__file__))
BANKING77_DIR = os.path.join(HERE, 'banking77')
CLINC150_DIR = os.path.join(HERE, 'clinc150')
OUT_OF_SCOPE = 'oos'

# The dataset name under which config.data.path names a user's CSV/TSV/JSONL file.
USER_FILE = 'file'


def banking77(validation_fraction: float = 0.1,
              validation_seed: int = labelled.VALIDATION_SEED) -> LabelledSplits:
  """Banking77: train minus a stratified validation carve-out, validation, and test.

  Label ids follow categories.json. Texts are stripped: a few upstream texts carry outer
  spaces or newlines, which say nothing about the intent.
  """
  with open(os.path.join(BANKING77_DIR, 'categories.json'), encoding='utf-8') as f:
    label_names = tuple(json.load(f))

  def read(split: str) -> Split:
    path = os.path.join(BANKING77_DIR, f'{split}.csv')
    # The strict reader users' files get: a CSV parser (some texts hold newlines inside
    # quotes), so a damaged copy of the shipped set fails as loudly as a user's file.
    rows = labelled.read_rows(path, 'text', 'category')
    return Split(tuple(t for t, _ in rows),
                 labelled.encode_labels([c for _, c in rows], label_names, path))

  train, validation, note = labelled.carve_validation(
      read('train'), validation_fraction, validation_seed)
  return LabelledSplits('banking77', {'train': train, 'validation': validation,
                                      'test': read('test')}, label_names, note)


def clinc150() -> LabelledSplits:
  """CLINC150 (full): 150 intents in sorted order as ids 0..149, then `oos` as id 150.

  Split sizes: train 15,000 + 100 oos, validation 3,000 + 100 oos, test 4,500 + 1,000 oos.
  """
  path = os.path.join(CLINC150_DIR, 'data_full.json')
  with open(path, encoding='utf-8') as f:
    data = json.load(f)
  intents = sorted({label for _, label in data['train']} - {OUT_OF_SCOPE})
  label_names = (*intents, OUT_OF_SCOPE)

  def read(key: str) -> Split:
    rows = data[key] + data[f'oos_{key}']
    return Split(tuple(text.strip() for text, _ in rows),
                 labelled.encode_labels([label for _, label in rows], label_names,
                                        f'{path} ({key})'))

  splits = {'train': read('train'), 'validation': read('val'), 'test': read('test')}
  note = "the set's own val split, with its oos_val queries"
  return LabelledSplits('clinc150', splits, label_names, note)


def load(name: str, *, path: str = '', text_field: str = 'text', label_field: str = 'label',
         validation_path: str = '', test_path: str = '', validation_fraction: float = 0.1
         ) -> LabelledSplits:
  """The set called `name`: 'banking77', 'clinc150', or 'file' (a user's file at `path`).

  The keywords mirror config.data fields; those a set does not use are ignored (CLINC150 has
  its own validation split, so `validation_fraction` does not touch it).
  """
  if name == 'banking77':
    return banking77(validation_fraction)
  if name == 'clinc150':
    return clinc150()
  if name == USER_FILE:
    if not path:
      raise ValueError(f"config.data.path must name a CSV/TSV/JSONL file when "
                       f"config.data.name='{USER_FILE}'")
    return labelled.load_file(
        path, text_field=text_field, label_field=label_field, validation_path=validation_path,
        test_path=test_path, validation_fraction=validation_fraction)
  raise ValueError(f"config.data.name={name!r} is not a classification set; use 'banking77', "
                   f"'clinc150' or '{USER_FILE}' (with config.data.path)")

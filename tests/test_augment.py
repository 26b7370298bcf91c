"""Tests of text augmentation (llmopt_jax/data/augment/) and its place in the input pipeline.

Each operation's rate is a probability per eligible unit (word or character), so the units it
edits over many queries follow a binomial law: the measured fraction must lie within 4
standard errors, sqrt(r (1 - r) / N), of the configured rate (a 1-in-15,000 chance of a false
alarm for a correct operation; the draws are seeded, so a pass is a pass for good).
"""

import collections
import math

import numpy as np
import pytest

from conftest import load_config
from llmopt_jax import hf
from llmopt_jax.data import classification, intents
from llmopt_jax.data.augment import chars, pipeline, synonyms, words
from llmopt_jax.data.augment.config import AugmentConfig
from llmopt_jax.data.labelled import Split

ENCODE = classification.byte_encoder(seq_len=200)


@pytest.fixture(scope='module')
def queries() -> tuple[str, ...]:
  """2,000 Banking77 training queries of five words or more, spread over the intents (the
  file is sorted by intent). Five words make an operation's fall-back to the original (all
  words deleted) too rare to bias a measured rate: at most 0.3^5 = 0.2% of queries."""
  texts = [t for t in intents.banking77()['train'].texts if len(t.split()) >= 5]
  return tuple(texts[::len(texts) // 2000][:2000])


def decode(batches) -> list[str]:
  """The texts byte-encoded batches hold (after each row's leading eos), in order."""
  return [bytes(row[mask][1:].astype(np.uint8)).decode() for batch in batches
          for row, mask in zip(batch['tokens'], batch['padding_mask'])]


def apply(op, texts, rate, seed=0, **extra) -> list[str]:
  return [op(t, rate, np.random.default_rng([seed, i]), **extra) for i, t in enumerate(texts)]


def _dedup(text: str) -> str:
  """The text with repeated words dropped, so a moved word is seen to move."""
  return ' '.join(dict.fromkeys(text.split()))


def _differ(a: str, b: str) -> int:
  return sum(x != y for x, y in zip(a, b, strict=True))


def _differ_words(a: str, b: str) -> int:
  return _differ(a.split(), b.split())


def _table_words(text: str) -> int:
  return sum(bool(synonyms.lookup(w, synonyms.table())) for w in text.split())


def _letters(text: str) -> int:
  return sum(c.lower() in chars.NEIGHBOURS for c in text)


def _cased(text: str) -> int:
  return sum(len(c.swapcase()) == 1 and c.swapcase() != c for c in text)


def _non_space(text: str) -> int:
  return sum(not c.isspace() for c in text)


# Per operation: (which queries it is measured on, eligible units of a query, units edited
# from a query to its edit, sigma inflation). Swap's moved-word count per text has at most
# twice the binomial variance (m = 1 becomes 0 or 2), hence sqrt(2).
MEASURES = {
    'delete': (lambda t: t, lambda t: len(t.split()),
               lambda a, b: len(a.split()) - len(b.split()), 1.0),
    'swap': (_dedup, lambda t: len(t.split()), _differ_words, math.sqrt(2)),
    'insert': (lambda t: t if _table_words(t) else None, lambda t: len(t.split()),
               lambda a, b: len(b.split()) - len(a.split()), 1.0),
    'synonym': (lambda t: t, _table_words, _differ_words, 1.0),
    'mask': (lambda t: t, lambda t: len(t.split()),
             lambda a, b: b.split().count('[MASK]'), 1.0),
    'typo': (lambda t: t, _letters, _differ, 1.0),
    'char_drop': (lambda t: t, _non_space, lambda a, b: _non_space(a) - _non_space(b), 1.0),
    'case_flip': (lambda t: t, _cased, _differ, 1.0),
}


def test_every_operation_is_measured():
  assert set(MEASURES) == set(pipeline.OPERATIONS)


@pytest.mark.parametrize('name', sorted(MEASURES))
@pytest.mark.parametrize('rate', [0.1, 0.3])
def test_operation_edits_at_its_rate(queries, name, rate):
  select, eligible, edited, inflation = MEASURES[name]
  texts = [t for t in map(select, queries) if t is not None]
  assert len(texts) > 1900
  out = apply(pipeline.OPERATIONS[name], texts, rate)
  units = sum(map(eligible, texts))
  measured = sum(edited(a, b) for a, b in zip(texts, out)) / units
  tolerance = 4 * inflation * math.sqrt(rate * (1 - rate) / units)
  assert abs(measured - rate) <= tolerance, (measured, rate, tolerance, units)


@pytest.mark.parametrize('name', sorted(MEASURES))
def test_operation_is_deterministic_and_seeded(queries, name):
  op = pipeline.OPERATIONS[name]
  texts = queries[:200]
  first = apply(op, texts, 0.2, seed=1)
  assert first == apply(op, texts, 0.2, seed=1)
  other = apply(op, texts, 0.2, seed=2)
  assert sum(a != b for a, b in zip(first, other)) > 100  # most of them differ
  assert apply(op, texts, 0.0) == list(texts)  # rate 0 is the identity, spacing included


@pytest.mark.parametrize('name', sorted(MEASURES))
def test_operation_never_empties_a_text(queries, name):
  op = pipeline.OPERATIONS[name]
  texts = [*queries[:100], 'card', 'a', '?', '  x  ', 'I  lost  my card']
  for rate in (0.5, 1.0):
    for text, out in zip(texts, apply(op, texts, rate)):
      assert out.strip(), (name, rate, text)


def test_full_rate_edges():
  rng = np.random.default_rng(0)
  text = 'I lost my card today'
  assert words.delete(text, 1.0, rng) == text  # nothing left: the original
  assert words.mask(text, 1.0, rng, token='<m>') == '<m> <m> <m> <m> <m>'
  assert all(a != b for a, b in zip(text.split(), words.swap(text, 1.0, rng).split()))
  assert chars.case_flip('Card', 1.0, rng) == 'cARD'
  assert chars.char_drop('ab cd', 1.0, rng) == 'ab cd'


def test_synonyms_keep_punctuation_and_capitals():
  table = {'card': ('menu',)}
  rng = np.random.default_rng(0)
  assert words.synonym('My Card? CARD card.', 1.0, rng, table=table) == 'My Menu? MENU menu.'
  assert words.insert('my card', 1.0, rng, table=table).split().count('menu') == 2
  assert words.insert('nothing here', 1.0, rng, table=table) == 'nothing here'


def test_synonym_table_is_shipped_and_clean():
  table = synonyms.table()
  assert len(table) > 5000
  assert 'refund' in table and 'repayment' in table['refund']
  for word, options in table.items():
    assert word == word.lower() and word not in options and options
    assert all(len(o.split()) == 1 and '_' not in o for o in options)
  assert 'the' not in table and 'my' not in table  # function words are never replaced


def test_typos_hit_neighbouring_keys():
  assert set(chars.NEIGHBOURS['s']) == set('awedxz')
  for a, neighbours in chars.NEIGHBOURS.items():
    assert all(a in chars.NEIGHBOURS[b] for b in neighbours)  # touching is symmetric
  out = chars.typo('s' * 200, 0.5, np.random.default_rng(0))
  assert set(out) - {'s'} <= set('awedxz') and len(out) == 200


def test_mask_token_comes_from_the_tokenizer():
  directory = hf.minilm_path()
  assert pipeline.tokenizer_mask(directory) == '[MASK]'
  assert pipeline.tokenizer_mask(None) == pipeline.PLACEHOLDER
  tokenizer = hf.load_tokenizer(directory, max_len=8)
  masked = words.mask('lost card', 1.0, np.random.default_rng(0), token='[MASK]')
  ids = tokenizer([masked])['tokens'][0]
  assert list(ids[:4]) == [101, 103, 103, 102]  # [CLS] [MASK] [MASK] [SEP]: one id per mask


# The pipeline.

def _split(n=30) -> Split:
  return Split(tuple(f'query number {i} about my lost card' for i in range(n)),
               np.arange(n, dtype=np.int32) % 4)


def _augmenter(copies=2, seed=7) -> pipeline.Augmenter:
  config = AugmentConfig.from_config({'augment': ('synonym:0.5', 'swap:0.3', 'typo:0.05'),
                                      'augment_copies': copies})
  return config.build(seed, None)


def test_augmented_epoch_holds_every_example_and_its_copies_with_their_labels():
  split, augmenter = _split(), _augmenter(copies=2)
  it = classification.ClassificationBatches(split, ENCODE, batch_size=9, seed=7,
                                            augment=augmenter)
  batches = [next(it) for _ in range(10)]  # exactly one epoch of 30 * 3 rows
  assert it.get_state()['epoch'] == 1 and it.get_state()['position'] == 0
  rows = classification.epoch_order(np.tile(split.labels, 3), 7, 0)
  expected = [augmenter(split.texts[r % 30], 0, int(r % 30), int(r // 30)) for r in rows]
  assert decode(batches) == expected
  index = np.concatenate([b['index'] for b in batches])
  np.testing.assert_array_equal(index, rows % 30)
  np.testing.assert_array_equal(np.concatenate([b['labels'] for b in batches]),
                                split.labels[index])
  assert collections.Counter(index.tolist()) == {i: 3 for i in range(30)}
  edited = sum(t != split.texts[i] for t, i in zip(expected, index))
  assert edited > 50  # of the 60 copies (a copy may come out unchanged)


def test_augmented_batches_resume_bit_identically():
  split, augmenter = _split(), _augmenter()
  make = lambda state=None: classification.ClassificationBatches(  # noqa: E731
      split, ENCODE, batch_size=8, seed=7, augment=augmenter, balanced=True, state=state)
  full = make()
  straight = [next(full) for _ in range(25)]  # over two epochs of 90 rows
  first = make()
  for _ in range(11):
    next(first)
  resumed = make(first.get_state())
  for a, b in zip(straight[11:], [next(resumed) for _ in range(14)]):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # Copies change between epochs, as they should.
  assert _augmenter()('my lost card', 0, 3, 1) != _augmenter()('my lost card', 1, 3, 1)


def test_without_augmentation_batches_are_the_plain_pipeline():
  """No augmenter: rows are the epoch order of the examples themselves, texts untouched,
  exactly as before augmentation existed; and the default config builds no augmenter."""
  split = _split()
  it = classification.ClassificationBatches(split, ENCODE, batch_size=10, seed=3)
  rows = np.concatenate([classification.epoch_order(split.labels, 3, e) for e in (0, 1)])
  batches = [next(it) for _ in range(6)]
  np.testing.assert_array_equal(np.concatenate([b['index'] for b in batches]), rows)
  assert decode(batches) == [split.texts[r] for r in rows]
  data = load_config('finetune', 'tiny').data
  assert AugmentConfig.from_config(data).build(0, None) is None
  assert AugmentConfig.from_config({'augment': ('swap:0.1',), 'augment_copies': 0}
                                   ).build(0, None) is None


@pytest.mark.parametrize('fields, error', [
    ({'augment': ('delete:0.1', 'swap:0.1', 'swp:0.1')},
     (r"config.data.augment\[2\]='swp:0.1': unknown operation 'swp'; choose from "
      r"\['backtranslate', 'case_flip'")),
    ({'augment': ('delete:1.5',)}, r"augment\[0\]='delete:1.5': rate 1.5 is outside \[0, 1\]"),
    ({'augment': ('mask:-0.1',)}, r"augment\[0\]='mask:-0.1': rate -0.1 is outside"),
    ({'augment': ('delete',)}, r"augment\[0\]='delete': needs a rate, e.g. 'delete:0.1'"),
    ({'augment': ('delete:0.1,swap:0.1',)}, r"rate '0.1,swap:0.1' is not a number"),
    ({'augment': (3,)}, r'augment\[0\]=3: not a string'),
    ({'augment_copies': -1}, r'config.data.augment_copies=-1 must be an integer >= 0'),
    ({'augment_copies': 1.5}, r'config.data.augment_copies=1.5 must be an integer'),
    ({'augment_mask': 'two words'}, r"config.data.augment_mask='two words' must be one word"),
])
def test_bad_settings_are_one_line_errors_naming_the_field(fields, error):
  with pytest.raises(ValueError, match=error) as raised:
    AugmentConfig.from_config(fields)
  assert '\n' not in str(raised.value)


def test_one_operation_given_as_a_string_is_one_operation():
  config = AugmentConfig.from_config({'augment': 'typo:0.05'})
  assert [(op.name, op.rate) for op in config.operations] == [('typo', 0.05)]


def test_tiny_finetune_on_a_few_shots_with_augmentation(tiny_bert_dir, tmp_path):
  """configs/finetune.py:tiny, 2 shots per class, two augmented copies: a few steps end to
  end, and the report records the cut training split."""
  from llmopt_jax.stages import finetune
  config = load_config('finetune', 'tiny')
  config.init.model = tiny_bert_dir
  config.data.shots_per_class = 2
  config.data.augment = ('synonym:0.3', 'mask:0.1')
  config.data.augment_copies = 2
  config.train.update(num_steps=3, eval_every=3, eval_batches=1)
  config.checkpoint.every_steps = 3
  config.test_batches = 1
  config.export = False
  summary = finetune.run(config, str(tmp_path))
  data = summary['test']['data']
  assert data['sizes']['train'] == 2 * 77
  assert data['train'].startswith('2 per class of the train split, seed 0')
  assert summary['test']['num_examples'] == config.train.batch_size

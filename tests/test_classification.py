"""Tests of classification data, batches, losses and metrics (no model needed).

Data and batch comparisons are of labels, ids, masks and weights that are copied, not
computed: exact. Float comparisons say where their tolerance comes from."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances
from llmopt_jax import classification_metrics as cm
from llmopt_jax import losses, metrics
from llmopt_jax.data import classification, intents, labelled, lm_pipeline
from llmopt_jax.data.labelled import Split

ENCODE = classification.byte_encoder(seq_len=12)


def identity_split(n=20, num_classes=3):
  """Labels are example ids mod num_classes; texts name the example, so rows are traceable."""
  return Split(tuple(f'ex{i}' for i in range(n)), np.arange(n, dtype=np.int32) % num_classes)


def example_ids(batch):
  """Which examples a batch holds, read back from the byte-encoded texts."""
  return [int(bytes(row[mask][1:].astype(np.uint8)).decode()[2:])
          for row, mask in zip(batch['tokens'], batch['padding_mask'])]


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


# Metrics.

# Rows are true classes, columns predictions; class 3 never occurs.
CONFUSION = np.array([[3, 1, 0, 0],
                      [0, 2, 2, 0],
                      [1, 0, 0, 0],
                      [0, 0, 0, 0]])


def test_f1_on_a_hand_checked_confusion_matrix():
  # class 0: TP 3, FP 1 (row 2), FN 1 -> F1 = 6 / (6 + 1 + 1) = 3/4
  # class 1: TP 2, FP 1 (row 0), FN 2 -> F1 = 4 / (4 + 1 + 2) = 4/7
  # class 2: TP 0, FP 2, FN 1         -> F1 = 0
  # class 3: absent from labels and predictions -> left out of the mean
  # macro-F1 = (3/4 + 4/7 + 0) / 3 = 37/84; accuracy = (3 + 2) / 9
  # Float64 arithmetic on exact counts, a few roundings of 1e-16: approx's default rel=1e-6
  # only absorbs the decimal fractions.
  report = cm.classification_report(CONFUSION, ['a', 'b', 'c', 'd'])
  assert report['macro_f1'] == pytest.approx(37 / 84)
  assert report['accuracy'] == pytest.approx(5 / 9)
  assert report['per_class_f1'] == pytest.approx({'a': 0.75, 'b': 4 / 7, 'c': 0.0, 'd': None})
  assert report['classes_scored'] == 3
  json.dumps(report)
  # finalize reduces a summed confusion matrix to the same macro-F1.
  means = metrics.finalize(metrics.total([{'confusion': (CONFUSION, 9.0)}]))
  assert means == {'macro_f1': pytest.approx(37 / 84)}


def test_out_of_scope_figures():
  report = cm.classification_report(CONFUSION, ['a', 'b', 'c', 'oos'], out_of_scope='c')
  assert report['in_scope_accuracy'] == pytest.approx(5 / 8)  # float64 on counts, as above
  assert report['out_of_scope_recall'] == 0.0


def test_metric_sums_of_two_halves_equal_the_whole():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(16, 5)).astype(np.float32)
  labels = rng.integers(5, size=16).astype(np.int32)
  weights = (rng.random(16) > 0.2).astype(np.float32)
  sums = jax.jit(lambda *a: cm.classification_sums(*a, label_smoothing=0.1))
  whole = metrics.total([sums(logits, labels, weights)])
  halves = metrics.total([sums(logits[s], labels[s], weights[s])
                          for s in (slice(0, 7), slice(7, 16))])
  # Counts (0/1 weights) are integers in float: exact in any order.
  np.testing.assert_array_equal(whole['confusion'][0], halves['confusion'][0])
  assert whole['confusion'][0].sum() == weights.sum()
  assert whole['accuracy'] == halves['accuracy']
  # 16 positive float32 losses summed at once or as 7 + 9: the order differs.
  assert whole['loss'][0] == pytest.approx(halves['loss'][0],
                                           rel=tolerances.sum_tolerance(len(logits), 1.0))
  assert isinstance(whole['loss'][0], float)  # scalar sums stay plain floats
  means = metrics.finalize(whole)
  report = cm.classification_report(whole['confusion'][0])  # float64 on the same counts
  assert means['macro_f1'] == pytest.approx(report['macro_f1'])
  assert means['accuracy'] == pytest.approx(report['accuracy'])


def test_label_smoothing_loss_matches_the_closed_form():
  # p = softmax([0, log 3]) = [1/4, 3/4]; label 1. With e = 0.2 the target is [0.1, 0.9].
  # The second row has weight 0 and must not count.
  logits = jnp.array([[0.0, math.log(3.0)], [5.0, -5.0]], jnp.float32)
  labels, weights = jnp.array([1, 0]), jnp.array([1.0, 0.0])
  loss, weight = losses.classification_loss(logits, labels, weights, 0.2)
  assert weight == 1.0
  # A dozen float32 roundings (log 3, the log-softmax, the blend; XLA's exp and log are good to
  # an ulp or two), none of a value above log 4.
  assert loss == pytest.approx(-(0.1 * math.log(0.25) + 0.9 * math.log(0.75)),
                               abs=12 * tolerances.EPS32 * math.log(4.0))
  plain, _ = losses.classification_loss(logits.astype(jnp.bfloat16), labels, weights)
  assert plain.dtype == jnp.float32
  # bf16 holds log 3 (in [1, 2)) to half a step, 2^-8, and -log p moves by 1 - p = 1/4 of it.
  assert plain == pytest.approx(-math.log(0.75), abs=2.0 ** -8 / 4)


def test_padding_rows_cannot_poison_the_loss():
  logits = jnp.array([[1.0, 2.0], [jnp.nan, jnp.nan]])
  loss, weight = losses.classification_loss(logits, jnp.array([1, 0]), jnp.array([1.0, 0.0]))
  assert np.isfinite(loss) and weight == 1.0


# Shipped data sets.

def test_banking77_has_77_labels_and_a_stratified_deterministic_validation_carve_out():
  data = intents.banking77()
  again = intents.banking77()
  assert data.num_classes == 77
  train, val = data['train'], data['validation']
  assert len(train) + len(val) == 10003 and len(data['test']) == 3080
  assert 0.095 < len(val) / 10003 < 0.105
  assert not set(train.texts) & set(val.texts)  # upstream texts are unique within train
  assert val.texts == again['validation'].texts
  np.testing.assert_array_equal(val.labels, again['validation'].labels)
  per_class = np.bincount(train.labels, minlength=77) + np.bincount(val.labels, minlength=77)
  np.testing.assert_array_equal(np.bincount(val.labels, minlength=77),
                                np.floor(0.1 * per_class + 0.5))
  assert '10%' in data.metadata()['validation']


def test_clinc150_has_151_labels_with_oos_in_every_split():
  data = intents.clinc150()
  assert data.num_classes == 151 and data.label_names[150] == 'oos'
  assert data.metadata()['sizes'] == {'train': 15100, 'validation': 3100, 'test': 5500}
  oos = {name: int((split.labels == 150).sum()) for name, split in data.splits.items()}
  assert oos == {'train': 100, 'validation': 100, 'test': 1000}


def test_unknown_data_set_name_is_a_clear_error():
  with pytest.raises(ValueError, match="'banking78' is not a classification set"):
    intents.load('banking78')
  with pytest.raises(ValueError, match='config.data.path'):
    intents.load('file')


# A user's own files.

def write(path, text):
  path.write_text(text, encoding='utf-8')
  return str(path)


@pytest.fixture
def user_files(tmp_path):
  rows = [(f'query number {i}', ['billing', 'refund', 'login'][i % 3]) for i in range(30)]
  csv_text = 'body,queue\n' + ''.join(f'"{t}, please",{q}\n' for t, q in rows)
  tsv_text = 'body\tqueue\n' + ''.join(f'{t}\t{q}\n' for t, q in rows)
  jsonl_text = ''.join(json.dumps({'body': t, 'queue': q}) + '\n' for t, q in rows)
  return {ext: write(tmp_path / f'train.{ext}', text)
          for ext, text in (('csv', csv_text), ('tsv', tsv_text), ('jsonl', jsonl_text))}


@pytest.mark.parametrize('ext', ['csv', 'tsv', 'jsonl'])
def test_user_file_loads_with_a_carved_validation_split(user_files, ext):
  data = intents.load('file', path=user_files[ext], text_field='body', label_field='queue')
  assert data.label_names == ('billing', 'login', 'refund')
  assert len(data['train']) == 27 and len(data['validation']) == 3  # one per class
  assert sorted(data['validation'].labels) == [0, 1, 2]
  assert 'test' not in data.splits
  if ext == 'csv':
    assert data['train'].texts[0] == 'query number 0, please'  # quoted commas survive


def test_user_file_with_validation_and_test_files(user_files, tmp_path):
  val = write(tmp_path / 'val.jsonl', '{"body": "reset my password", "queue": "login"}\n')
  data = labelled.load_file(user_files['jsonl'], text_field='body', label_field='queue',
                            validation_path=val, test_path=val)
  assert len(data['train']) == 30 and list(data['test'].labels) == [1]
  assert data.validation_note.endswith('val.jsonl')


def test_missing_column_names_the_column_the_file_and_the_columns(user_files):
  for ext in ('csv', 'tsv', 'jsonl'):
    with pytest.raises(ValueError) as e:
      labelled.load_file(user_files[ext], text_field='body', label_field='intent')
    message = str(e.value)
    assert "'intent'" in message and user_files[ext] in message and "'queue'" in message


def test_unknown_label_in_a_test_file_names_the_label_and_the_file(user_files, tmp_path):
  test = write(tmp_path / 'test.csv', 'body,queue\nwhere is my parcel,shipping\n')
  with pytest.raises(ValueError, match=f"label 'shipping' in {test}"):
    labelled.load_file(user_files['csv'], text_field='body', label_field='queue',
                       test_path=test)


def test_empty_and_missing_files_are_clear_errors(tmp_path):
  for name, text, error in (('empty.csv', '', 'is empty'), ('header.csv', 'text,label\n',
                            'holds no examples'), ('blank.jsonl', '\n\n', 'holds no examples')):
    with pytest.raises(ValueError, match=error):
      labelled.load_file(write(tmp_path / name, text))
  with pytest.raises(FileNotFoundError, match='nope.csv'):
    labelled.load_file(str(tmp_path / 'nope.csv'))
  with pytest.raises(ValueError, match="unknown format '.txt'"):
    labelled.load_file(write(tmp_path / 'a.txt', 'x'))


# Batches.

def test_batches_have_the_documented_keys_shapes_and_dtypes():
  batch = next(classification.ClassificationBatches(identity_split(), ENCODE, batch_size=4,
                                                     seed=0))
  assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
      'tokens': ((4, 12), 'int32'), 'padding_mask': ((4, 12), 'bool'),
      'token_types': ((4, 12), 'int32'), 'labels': ((4,), 'int32'),
      'weights': ((4,), 'float32'), 'index': ((4,), 'int32')}


def test_training_batches_name_their_examples():
  split = identity_split()
  batches = take(classification.ClassificationBatches(split, ENCODE, batch_size=6, seed=3), 4)
  for batch in batches:  # `index` points at the very example each row holds
    np.testing.assert_array_equal(split.labels[batch['index']], batch['labels'])
    assert example_ids(batch) == list(batch['index'])


def test_batches_are_deterministic_and_resume_exactly_across_epochs():
  make = lambda seed, state=None: classification.ClassificationBatches(  # noqa: E731
      identity_split(), ENCODE, batch_size=6, seed=seed, state=state)
  full = take(make(1), 8)  # 48 rows: more than two epochs of 20
  assert [example_ids(b) for b in full] == [example_ids(b) for b in take(make(1), 8)]
  assert example_ids(full[0]) != example_ids(next(make(2)))
  first = make(1)
  take(first, 3)
  state = json.loads(json.dumps(first.get_state()))
  assert state['epoch'] == 0 and state['position'] == 18
  for a, b in zip(full[3:], take(make(1, state), 5)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  epochs = [sorted(sum((example_ids(b) for b in full), [])[k:k + 20]) for k in (0, 20)]
  assert epochs == [list(range(20))] * 2  # each epoch is a permutation


def test_shards_are_disjoint_and_cover_an_epoch():
  split, count = identity_split(20), 3
  seen = []
  for shard in range(count):
    it = classification.ClassificationBatches(split, ENCODE, batch_size=1, seed=5,
                                              shard_index=shard, shard_count=count)
    per_epoch = len(range(shard, 20, count))
    seen.append(sum((example_ids(b) for b in take(it, per_epoch)), []))
    assert it.get_state()['epoch'] == 1 and it.get_state()['position'] == 0
  assert sorted(sum(seen, [])) == list(range(20))
  stacked = lm_pipeline.ShardedBatches([classification.ClassificationBatches(
      split, ENCODE, batch_size=2, seed=5, shard_index=s, shard_count=count)
      for s in range(count)])
  assert next(stacked)['labels'].shape == (6,)
  assert len(stacked.get_state()['shards']) == count


def test_class_balanced_sampling_evens_out_label_frequencies():
  labels = np.array([0] * 90 + [1] * 9 + [2], np.int32)  # 90% / 9% / 1%
  split = Split(tuple(str(i) for i in range(100)), labels)
  it = classification.ClassificationBatches(split, ENCODE, batch_size=50, seed=0,
                                            balanced=True)
  drawn = np.concatenate([b['labels'] for b in take(it, 60)])  # 3000 draws
  # Seeded, so deterministic; a frequency of 1/3 over 3000 draws has a standard deviation of
  # sqrt(1/3 * 2/3 / 3000) = 0.0086, and 0.03 is 3.5 of them.
  np.testing.assert_allclose(np.bincount(drawn) / len(drawn), [1 / 3] * 3, atol=0.03)
  np.testing.assert_array_equal(classification.epoch_order(labels, 0, 4, balanced=True),
                                classification.epoch_order(labels, 0, 4, balanced=True))


def test_eval_batches_are_in_order_padded_and_shard_the_split():
  split = identity_split(11)
  shards = [classification.eval_batches(split, ENCODE, batch_size=2, shard_index=s,
                                        shard_count=3) for s in range(3)]
  assert [len(batches) for batches in shards] == [2, 2, 2]  # ceil(ceil(11 / 3) / 2)
  for s, batches in enumerate(shards):
    weights = np.concatenate([b['weights'] for b in batches])
    ids = sum((example_ids(b) for b in batches), [])
    real = [i for i, w in zip(ids, weights) if w]
    assert real == list(range(s, 11, 3))
    assert all(b['padding_mask'].any(axis=1).all() for b in batches)  # no empty padding rows
  assert sum(b['weights'].sum() for batches in shards for b in batches) == 11

"""Tests of llmopt_jax.data: tokenizers, the shipped TFDS builder, sources and LM batches.

Every comparison here is of token ids, targets, masks or weights that the pipeline copies
rather than computes: exact equality."""

import json
import re

import numpy as np
import pytest

from llmopt_jax.data import lm_pipeline, sources, tokenizers
from llmopt_jax.data.tiny_shakespeare import TinyShakespeare

TEXTS = ['Hello, world.', 'naïve café — 東京 🎉', '  two  spaces\n\nand\ttabs ',
         '<eos> literal <pad>']
BYTES = tokenizers.ByteTokenizer()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def shakespeare(data_dir):
  return {split: sources.load_text_source('tiny_shakespeare', split, data_dir=data_dir)
          for split in ('train', 'validation')}


@pytest.fixture(scope='module')
def bpe(shakespeare):
  # Train on a slice: enough to learn merges, fast enough for every test run.
  return tokenizers.BpeTokenizer.train(
      (shakespeare['train'][i] for i in range(2000)), vocab_size=512)


def tiny_source(n=11):
  """Short distinct documents, so an epoch is a handful of batches."""
  return sources.ListSource([f'doc{i}' + 'x' * (i % 4) for i in range(n)])


def stream_docs(batches):
  """The documents of the token stream the batches were cut from (byte tokenizer)."""
  stream = np.concatenate([batches[0]['inputs'][0, :1]] +
                          [row for b in batches for row in b['targets']])
  ends = np.flatnonzero(stream == BYTES.eos_id)
  return [BYTES.decode(doc) for doc in np.split(stream, ends + 1)[:len(ends)]]


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same(batches_a, batches_b):
  for a, b in zip(batches_a, batches_b, strict=True):
    for key in ('inputs', 'targets', 'weights'):
      np.testing.assert_array_equal(a[key], b[key])


# Tokenizers.

@pytest.mark.parametrize('text', TEXTS)
def test_byte_tokenizer_round_trips(text):
  ids = BYTES.encode(text)
  assert ids.dtype == np.int32 and ids.max() < 256
  assert BYTES.decode(np.append(ids, [BYTES.eos_id, BYTES.pad_id])) == text


@pytest.mark.parametrize('text', TEXTS)
def test_bpe_round_trips(bpe, text):
  ids = bpe.encode(text)
  assert ids.dtype == np.int32 and ids.max() < bpe.vocab_size
  assert bpe.eos_id not in ids  # A literal '<eos>' is text, not the special id.
  assert bpe.decode(ids) == text


def test_bpe_compresses_and_reloads_identically(bpe, shakespeare, tmp_path):
  text = '\n\n'.join(lm_pipeline.iter_texts(shakespeare['validation']))
  assert len(bpe.encode(text)) < 0.7 * len(text.encode())  # Merges learned on train help.
  path = str(tmp_path / 'sub' / 'bpe.json')
  bpe.save(path)
  reloaded = tokenizers.BpeTokenizer.load(path)
  assert (reloaded.vocab_size, reloaded.pad_id, reloaded.eos_id) == (512, 0, 1)
  for t in TEXTS + [text[:5000]]:
    np.testing.assert_array_equal(reloaded.encode(t), bpe.encode(t))


def test_bpe_load_errors_name_the_path(tmp_path):
  missing = str(tmp_path / 'missing.json')
  with pytest.raises(FileNotFoundError, match='missing.json'):
    tokenizers.BpeTokenizer.load(missing)
  corrupt = tmp_path / 'corrupt.json'
  corrupt.write_text('{"not": "a tokenizer"')
  with pytest.raises(ValueError, match='corrupt.json') as e:
    tokenizers.BpeTokenizer.load(str(corrupt))
  assert '\n' not in str(e.value)


def test_get_tokenizer_trains_once_then_loads(tmp_path):
  path = str(tmp_path / 'bpe.json')
  def train():
    return ['the quick brown fox jumps over the lazy dog'] * 50
  def fail():
    raise AssertionError('must load the saved file, not train again')
  first = tokenizers.get_tokenizer('bpe', vocab_size=300, path=path, train_texts=train)
  second = tokenizers.get_tokenizer('bpe', vocab_size=300, path=path, train_texts=fail)
  np.testing.assert_array_equal(first.encode('lazy fox'), second.encode('lazy fox'))
  assert isinstance(tokenizers.get_tokenizer('byte', vocab_size=258, path=None,
                                             train_texts=fail), tokenizers.ByteTokenizer)


def test_get_tokenizer_errors():
  with pytest.raises(ValueError, match=r"config\.data\.tokenizer='sentencepiece'.*'byte'"):
    tokenizers.get_tokenizer('sentencepiece', vocab_size=512, path=None, train_texts=list)
  with pytest.raises(ValueError, match='258 ids but the vocab_size is 100'):
    tokenizers.get_tokenizer('byte', vocab_size=100, path=None, train_texts=list)


# The shipped builder and sources.

def test_shakespeare_splits_reproduce_the_corpus(shakespeare):
  train, validation = (list(lm_pipeline.iter_texts(shakespeare[s])) for s in shakespeare)
  corpus = TinyShakespeare.corpus_path.read_text()
  assert '\n\n'.join(train + validation) + '\n' == corpus
  # The cut is the first speech starting at or after 90% of the characters.
  first_val_start = sum(len(t) + 2 for t in train)
  last_train_start = first_val_start - len(train[-1]) - 2
  assert last_train_start < 0.9 * len(corpus) <= first_val_start
  assert 0.09 < 1 - first_val_start / len(corpus) < 0.11


def test_builder_info_and_prepare_twice_is_a_noop(shakespeare, data_dir):
  builder = TinyShakespeare(data_dir=data_dir, file_format='array_record')
  assert builder.is_prepared()
  assert 'karpathy2015charrnn' in builder.info.citation
  assert builder.info.homepage == 'https://github.com/karpathy/char-rnn'
  info_file = builder.data_path / 'dataset_info.json'
  before = info_file.stat().mtime
  again = sources.load_text_source('tiny_shakespeare', 'validation', data_dir=data_dir)
  assert info_file.stat().mtime == before
  assert again[0] == shakespeare['validation'][0]


def one_line_error(error_type, match, **kwargs):
  with pytest.raises(error_type, match=match) as e:
    sources.load_text_source(**kwargs)
  assert '\n' not in str(e.value)


def test_source_errors(shakespeare, data_dir, tmp_path):
  one_line_error(ValueError, "unknown dataset 'no_such_set'", name='no_such_set',
                 split='train', data_dir=data_dir)
  one_line_error(FileNotFoundError,
                 re.escape(f'tfds build lm1b --file_format=array_record --data_dir={tmp_path}'),
                 name='lm1b', split='train', data_dir=str(tmp_path))
  one_line_error(ValueError, r"no split 'test'; available: \['train', 'validation'\]",
                 name='tiny_shakespeare', split='test', data_dir=data_dir)
  one_line_error(ValueError, r"config\.data\.text_field='content'.*\['text'\]",
                 name='tiny_shakespeare', split='train[:5%]', data_dir=data_dir,
                 text_field='content')


def test_corpus_file_errors(monkeypatch, tmp_path):
  missing = tmp_path / 'gone.txt'
  monkeypatch.setattr(TinyShakespeare, 'corpus_path', missing)
  one_line_error(FileNotFoundError, 'gone.txt is missing', name='tiny_shakespeare',
                 split='train', data_dir=str(tmp_path / 'a'))
  missing.write_text('\n\n')
  one_line_error(ValueError, 'gone.txt is empty', name='tiny_shakespeare', split='train',
                 data_dir=str(tmp_path / 'b'))
  # Splits into ['hello', '', '']: validation is one empty speech.
  missing.write_text('hello\n\n\n\n\n')
  one_line_error(ValueError, "split 'validation' of tiny_shakespeare has no text",
                 name='tiny_shakespeare', split='validation', data_dir=str(tmp_path / 'c'))


# Packed training batches.

def make_batches(source=None, **kwargs):
  kwargs = {'seq_len': 8, 'batch_size': 2, 'seed': 0} | kwargs
  return lm_pipeline.LMBatches(source or tiny_source(), BYTES, **kwargs)


def test_batches_shapes_and_shift():
  for batch in take(make_batches(), 5):
    assert batch['inputs'].shape == batch['targets'].shape == (2, 8)
    assert batch['inputs'].dtype == batch['targets'].dtype == np.int32
    assert batch['weights'].dtype == np.float32 and np.all(batch['weights'] == 1)
    np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
    # Consecutive rows share one token: no transition is skipped or seen twice.
    np.testing.assert_array_equal(batch['inputs'][1:, 0], batch['targets'][:-1, -1])


def test_seeds_decide_the_order():
  assert_same(take(make_batches(seed=3), 6), take(make_batches(seed=3), 6))
  a, b = take(make_batches(seed=3), 6), take(make_batches(seed=4), 6)
  assert any(not np.array_equal(x['inputs'], y['inputs']) for x, y in zip(a, b))


def epoch_docs(iterator, epoch):
  """The documents an iterator reads in `epoch` (byte tokenizer, distinct documents)."""
  batches = []
  while iterator.get_state()['epoch'] <= epoch:
    batches.append(next(iterator))
  return batches


@pytest.mark.parametrize('epoch', [0, 1])
def test_shards_are_disjoint_and_cover(epoch):
  source, count = tiny_source(20), 3
  seen = []
  for index in range(count):
    docs = stream_docs(epoch_docs(make_batches(source, shard_index=index,
                                               shard_count=count), epoch))
    per_epoch = len(range(index, len(source), count))
    seen.append(docs[epoch * per_epoch:(epoch + 1) * per_epoch])
  assert sum(len(s) for s in seen) == len(source)
  assert sorted(sum(seen, [])) == sorted(lm_pipeline.iter_texts(source))


def test_epochs_are_different_permutations():
  source = tiny_source(20)
  docs = stream_docs(epoch_docs(make_batches(source), 1))
  first, second = docs[:20], docs[20:40]
  assert sorted(first) == sorted(second) == sorted(lm_pipeline.iter_texts(source))
  assert first != second


@pytest.mark.parametrize('shard_index', [0, 1])
def test_resume_gives_the_uninterrupted_batches(shard_index):
  kwargs = {'shard_index': shard_index, 'shard_count': 2, 'seq_len': 5}
  reference = take(make_batches(**kwargs), 30)
  epochs = set()
  for k in range(0, 25, 3):
    iterator = make_batches(**kwargs)
    take(iterator, k)
    state = json.loads(json.dumps(iterator.get_state()))
    assert all(type(v) is int for v in state.values()) and len(state) == 5
    epochs.add(state['epoch'])
    resumed = make_batches(**kwargs, state=state)
    assert_same(take(resumed, 5), reference[k:k + 5])
    # set_state also works on an iterator that has moved elsewhere already.
    take(resumed, 2)
    resumed.set_state(state)
    assert_same(take(resumed, 2), reference[k:k + 2])
  assert len(epochs) >= 3  # The resumed positions span several epoch boundaries.


def test_resume_rejects_foreign_states():
  state = make_batches(shard_index=0, shard_count=2).get_state()
  with pytest.raises(ValueError, match='shard 0 of 2 cannot resume shard 1 of 2'):
    make_batches(shard_index=1, shard_count=2, state=state)
  with pytest.raises(ValueError, match='offset is outside'):
    make_batches(state={'epoch': 0, 'doc': 0, 'offset': 1000})


def test_bpe_batches_on_shakespeare(shakespeare, bpe):
  batches = lm_pipeline.LMBatches(shakespeare['train'], bpe, seq_len=64, batch_size=4, seed=0)
  batch = next(batches)
  assert batch['inputs'].shape == (4, 64) and batch['inputs'].max() < bpe.vocab_size


# Eval batches.

@pytest.mark.parametrize('seq_len,batch_size', [(8, 2), (5, 3), (1, 1)])
@pytest.mark.parametrize('count', [1, 3])
def test_eval_weights_count_every_target_once(seq_len, batch_size, count):
  source = tiny_source(13)
  for index in range(count):
    batches = lm_pipeline.eval_batches(source, BYTES, seq_len=seq_len, batch_size=batch_size,
                                       shard_index=index, shard_count=count)
    stream = np.concatenate([np.append(BYTES.encode(source[i]), BYTES.eos_id)
                             for i in range(index, len(source), count)])
    assert sum(b['weights'].sum() for b in batches) == len(stream) - 1
    targets = np.concatenate([b['targets'][b['weights'] > 0] for b in batches])
    np.testing.assert_array_equal(targets, stream[1:])
    for b in batches:
      assert b['inputs'].shape == (batch_size, seq_len)
      assert np.all(b['targets'][b['weights'] == 0] == BYTES.pad_id)


def test_eval_exact_fit_partial_tail_and_max_batches():
  exact = sources.ListSource(['abcdefg'] * 2)  # 16 tokens: 3 rows of 5 targets.
  (batch,) = lm_pipeline.eval_batches(exact, BYTES, seq_len=5, batch_size=3)
  assert batch['weights'].all()
  tail = sources.ListSource(['abcdefgh'] * 2)  # 18 tokens: a full batch and 1 target more.
  full, last = lm_pipeline.eval_batches(tail, BYTES, seq_len=8, batch_size=2)
  assert full['weights'].all() and last['weights'].sum() == last['weights'][0, 0] == 1
  many = lm_pipeline.eval_batches(tiny_source(50), BYTES, seq_len=4, batch_size=2)
  assert len(many) > 3
  assert_same(lm_pipeline.eval_batches(tiny_source(50), BYTES, seq_len=4, batch_size=2,
                                       max_batches=3), many[:3])

"""Augmented language-model batches (data/lm_pipeline.py with data/augment/, tasks/lm.py).

Documents here are distinct word sequences read through the byte tokenizer, so the token
stream of an epoch splits back (at its eos ids) into the exact texts it was packed from, and
every comparison is of copied ids: exact equality. The one statistical check, the edit rate, is
a binomial count held to 4.5 standard errors (a 1-in-150,000 false alarm; the draws are seeded,
so a pass is a pass for good).
"""

import itertools
import json
import math
import os

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from conftest import load_config
from test_data import assert_same, take
from llmopt_jax import hf, workdir as workdir_lib
from llmopt_jax.data import lm_pipeline, sources, tokenizers
from llmopt_jax.data.augment import pipeline
from llmopt_jax.data.augment.config import AugmentConfig
from llmopt_jax.tasks import lm

BYTES = tokenizers.ByteTokenizer()
WORDS = ('the', 'king', 'rode', 'north', 'at', 'dawn', 'with', 'his', 'men', 'and', 'a', 'horse')


def documents(n: int, words: int) -> sources.ListSource:
  """n distinct documents: a name, then `words - 1` words drawn from WORDS."""
  rng = np.random.default_rng(0)
  return sources.ListSource([' '.join([f'doc{i}', *rng.choice(WORDS, words - 1)])
                             for i in range(n)])


def augmenter(spec=('delete:0.3', 'swap:0.2'), copies=2, seed=5) -> pipeline.Augmenter:
  return AugmentConfig.from_config({'augment': spec, 'augment_copies': copies}).build(seed, None)


def batches(source, augment=None, **kwargs) -> lm_pipeline.LMBatches:
  kwargs = {'seq_len': 8, 'batch_size': 2, 'seed': 5} | kwargs
  return lm_pipeline.LMBatches(source, BYTES, augment=augment, **kwargs)


def epoch_texts(iterator, epochs: int, per_epoch: int) -> list[list[str]]:
  """The texts an iterator, from its start, reads in each of its first `epochs` epochs, of
  `per_epoch` documents each."""
  read = []
  while iterator.get_state()['epoch'] < epochs:
    read.append(next(iterator))
  # Row r's inputs are the stream's tokens [r T, (r + 1) T): together, the stream read so far.
  stream = np.concatenate([b['inputs'].reshape(-1) for b in read])
  ends = np.flatnonzero(stream == BYTES.eos_id)
  texts = [BYTES.decode(doc) for doc in np.split(stream, ends + 1)[:len(ends)]]
  return [texts[e * per_epoch:(e + 1) * per_epoch] for e in range(epochs)]


def virtual_texts(source, augment, epoch: int) -> list[str]:
  """Every virtual document of an epoch: each document, then its copies, as the augmenter
  makes them (copy 0 is the document itself)."""
  return [augment(source[d], epoch, d, k) if k else source[d]
          for d in range(len(source)) for k in range(1 + augment.copies)]


def test_without_augmentation_batches_are_todays():
  """No augmenter, or one of 0 copies: the stream is the documents in the order of
  `default_rng([seed, epoch]).permutation(N)`, shard s of k taking every k-th, windowed into
  rows of T + 1 tokens that overlap by one: the pipeline as it was before augmentation."""
  source, seed, (b, seq_len) = documents(9, 3), 5, (2, 8)
  for shard, count in ((0, 1), (1, 2)):
    stream = []
    for epoch in range(4):
      order = np.random.default_rng([seed, epoch]).permutation(len(source))[shard::count]
      stream += [t for d in order for t in (*BYTES.encode(source[int(d)]), BYTES.eos_id)]
    stream = np.asarray(stream, np.int32)
    steps = (len(stream) - 1) // (b * seq_len)
    rows = np.arange(b)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    expected = [{'inputs': stream[i * b * seq_len + rows][:, :-1],
                 'targets': stream[i * b * seq_len + rows][:, 1:],
                 'weights': np.ones((b, seq_len), np.float32)} for i in range(steps)]
    none = pipeline.Augmenter(augmenter().edits, copies=0, seed=seed)
    for augment in (None, none):
      assert_same(take(batches(source, augment, shard_index=shard, shard_count=count),
                       steps), expected)
  assert AugmentConfig.from_config({}).build(seed, None) is None


@pytest.mark.parametrize('copies', [1, 2])
def test_an_epoch_reads_every_document_and_its_edited_copies(copies):
  source, augment = documents(10, 8), augmenter(copies=copies)
  read = epoch_texts(batches(source, augment), 2, len(source) * (1 + copies))
  for epoch, texts in enumerate(read):
    assert len(texts) == len(source) * (1 + copies)  # eos ids: one per virtual document
    assert sorted(texts) == sorted(virtual_texts(source, augment, epoch))
    assert set(lm_pipeline.iter_texts(source)) <= set(texts)  # every original, unchanged
    edited = [t for t in texts if t not in set(lm_pipeline.iter_texts(source))]
    assert len(edited) >= len(source) * copies * 0.8  # P(a copy is unedited) < 0.7^8 ~ 6%
  assert read[0] != read[1]  # a new order and new copies every epoch


def test_deletion_rate_over_the_copies_is_the_configured_rate():
  """The copies of an epoch lose Binomial(W, 0.3) of their W words: each word goes with
  probability 0.3. (A copy that would lose every one of its 12 words keeps them all instead,
  a bias of at most 0.3^12 per copy, far below the bound.)"""
  rate, copies, source = 0.3, 3, documents(40, 12)
  augment = augmenter((f'delete:{rate}',), copies=copies)
  texts = epoch_texts(batches(source, augment), 1, len(source) * (1 + copies))[0]
  words = sum(len(source[i].split()) for i in range(len(source)))
  deleted = (1 + copies) * words - sum(len(t.split()) for t in texts)
  trials = copies * words
  assert abs(deleted - rate * trials) <= 4.5 * math.sqrt(trials * rate * (1 - rate)), (
      deleted / trials)


@pytest.mark.parametrize('shard_index', [0, 1])
def test_augmented_batches_resume_bit_identically(shard_index):
  source, augment = documents(6, 4), augmenter(copies=1)
  kwargs = {'shard_index': shard_index, 'shard_count': 2, 'seq_len': 5}
  reference = take(batches(source, augment, **kwargs), 50)
  epochs = set()
  for k in range(0, 45, 4):
    iterator = batches(source, augment, **kwargs)
    take(iterator, k)
    state = json.loads(json.dumps(iterator.get_state()))
    epochs.add(state['epoch'])
    assert_same(take(batches(source, augment, state=state, **kwargs), 5), reference[k:k + 5])
  assert len(epochs) >= 3  # resumed mid-epoch in several epochs, across their boundaries


@pytest.mark.parametrize('epoch', [0, 1])
def test_shards_split_the_virtual_documents(epoch):
  source, augment, count = documents(7, 5), augmenter(copies=2), 3
  everything = virtual_texts(source, augment, epoch)
  sizes = [len(range(s, len(everything), count)) for s in range(count)]
  read = [epoch_texts(batches(source, augment, shard_index=s, shard_count=count), epoch + 1,
                      sizes[s])[epoch] for s in range(count)]
  assert sorted(itertools.chain(*read)) == sorted(everything)


def test_a_tiny_pretrain_run_with_augmentation(tfds_dir, tmp_path, capsys):
  from llmopt_jax.stages import pretrain
  config = load_config('pretrain', 'tiny')
  config.data.tfds_data_dir = tfds_dir
  config.data.augment = ('swap:0.1',)
  config.train.update(num_steps=3, eval_every=3)
  summary = pretrain.run(config, str(tmp_path))
  assert np.isfinite(summary['final_eval']['eval/loss'])
  said = f'Augmentation: {lm.training_data_options(config).describe()}; an epoch reads '
  assert said in capsys.readouterr().out


def test_a_bad_operation_is_one_line_before_any_work(tfds_dir, tmp_path):
  config = load_config('pretrain', 'tiny,tokenizer=bpe')
  config.data.tfds_data_dir = tfds_dir
  config.data.augment = ('swap:0.1', 'explode:0.1')
  with pytest.raises(ValueError, match=r"^config.data.augment\[1\]='explode:0.1': unknown "
                                       r"operation 'explode'; choose from [^\n]*$"):
    lm.pretraining(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'tokenizer.json')  # failed before the BPE trained


def test_mask_never_writes_the_end_of_text_token(tmp_path):
  """GPT-2 declares its end-of-text as its unknown token; `mask` falls back to the
  placeholder rather than end a document mid-way, and refuses it when configured."""
  vocab = {'<|endoftext|>': 0, 'the': 1, 'king': 2, pipeline.PLACEHOLDER: 3}
  tokenizer = HFTokenizer(models.WordLevel(vocab, unk_token='<|endoftext|>'))
  tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer.add_special_tokens(['<|endoftext|>'])
  tokenizer.save(str(tmp_path / 'tokenizer.json'))
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'unk_token': '<|endoftext|>'}))
  (tmp_path / 'config.json').write_text(json.dumps({'eos_token_id': 0}))
  gpt2_like = hf.load_tokenizer(str(tmp_path), max_len=1)
  assert lm._mask_token('', gpt2_like, str(tmp_path)) == pipeline.PLACEHOLDER
  assert lm._mask_token('king', gpt2_like, str(tmp_path)) == 'king'
  with pytest.raises(ValueError, match=r"^config.data.augment_mask='<\|endoftext\|>' encodes"):
    lm._mask_token('<|endoftext|>', gpt2_like, str(tmp_path))


def test_configs_without_the_fields_are_off_and_resume_older_runs(tfds_dir, tmp_path):
  """The LM configs carry the fields, off; a config without them (an older run's) is off too,
  and a workdir that trained under such a config resumes under today's."""
  new = load_config('pretrain', 'tiny')
  finetune = load_config('finetune', 'tiny,task=lm')
  for config in (new, finetune, load_config('distill', 'tiny,task=lm')):
    assert config.data.augment == () and not lm.training_data_options(config).enabled
  old = load_config('pretrain', 'tiny')
  for field in ('augment', 'augment_copies', 'augment_mask'):
    del old.data[field]
  assert not lm.training_data_options(old).enabled
  workdir_lib.prepare(str(tmp_path), old)
  (tmp_path / 'summary.json').write_text('{}')  # the old run has trained
  workdir_lib.release(str(tmp_path))
  workdir_lib.prepare(str(tmp_path), new)
  workdir_lib.release(str(tmp_path))

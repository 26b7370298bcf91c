"""Consistency training (UDA) in the classification fine-tune: the paired unlabelled batches
(llmopt_jax/data/unlabelled.py), the loss term (llmopt_jax/tasks/consistency_training.py), the
config checks, and a tiny fine-tune with the term on, end to end.

The loss itself (KL to the sharpened clean prediction, its closed-form gradient) is tested in
test_consistency.py; here it meets a model, the train step and the pipeline.
"""

import json

import jax
import numpy as np
import optax
import pytest

from conftest import load_config
from llmopt_jax.data import classification, lm_pipeline, unlabelled
from llmopt_jax.data.augment.config import AugmentConfig
from llmopt_jax.data.labelled import Split
from llmopt_jax.models.config import TransformerConfig
from llmopt_jax.models.heads import SequenceClassifier
from llmopt_jax.tasks import classification as classification_task
from llmopt_jax.tasks.consistency_training import ConsistencyConfig, make_loss_fn
from llmopt_jax.train import state as state_lib
from llmopt_jax.train import step as step_lib
from llmopt_jax.train.checkpoint import Checkpoints

ENCODE = classification.byte_encoder(seq_len=64)


def decode(batch, prefix: str) -> list[str]:
  """The texts of one view of byte-encoded rows (after each row's leading eos)."""
  return [bytes(row[mask][1:].astype(np.uint8)).decode()
          for row, mask in zip(batch[prefix + 'tokens'], batch[prefix + 'padding_mask'])]


# ---- The paired batches -----------------------------------------------------------------------

LABELLED = Split(tuple(f'labelled query {i} about my card' for i in range(20)),
                 np.arange(20, dtype=np.int32) % 4)
TEXTS = tuple(f'unlabelled text number {i} on a lost card' for i in range(26))


def _augmenter():
  return AugmentConfig.from_config({'augment': ('synonym:0.5', 'swap:0.3')}).build(11, None)


def _paired(state=None, shard_count=2):
  """A process reading `shard_count` shards: 4 labelled and 6 unlabelled rows per shard."""
  shards = [unlabelled.WithUnlabelled(
      classification.ClassificationBatches(LABELLED, ENCODE, batch_size=4, seed=3,
                                           shard_index=s, shard_count=shard_count),
      unlabelled.UnlabelledBatches(TEXTS, ENCODE, batch_size=6, seed=3, shard_index=s,
                                   shard_count=shard_count, augment=_augmenter()))
      for s in range(shard_count)]
  batches = lm_pipeline.ShardedBatches(shards)
  if state is not None:
    batches.set_state(state)
  return batches


def test_paired_batches_resume_bit_identically_from_a_json_state():
  straight = _paired()
  expected = [next(straight) for _ in range(12)]  # over two unlabelled epochs (26 texts)
  first = _paired()
  for _ in range(5):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # as a checkpoint stores it
  assert all('unlabelled' in shard for shard in state['shards'])
  resumed = _paired(state)
  for want in expected[5:]:
    got = next(resumed)
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_views_are_the_texts_and_their_augmentations_each_once_per_epoch():
  it = unlabelled.UnlabelledBatches(TEXTS, ENCODE, batch_size=13, seed=5, augment=_augmenter())
  first, second = next(it), next(it)  # exactly epoch 0
  index = np.concatenate([first['unlabelled_index'], second['unlabelled_index']])
  assert sorted(index.tolist()) == list(range(len(TEXTS)))
  clean = decode(first, unlabelled.CLEAN) + decode(second, unlabelled.CLEAN)
  assert clean == [TEXTS[i] for i in index]
  augmented = decode(first, unlabelled.AUGMENTED) + decode(second, unlabelled.AUGMENTED)
  assert augmented == [_augmenter()(TEXTS[i], 0, int(i), 1) for i in index]
  assert sum(a != c for a, c in zip(augmented, clean)) > len(TEXTS) // 2
  # The two shards of an epoch are disjoint and cover it; without an augmenter, one view.
  shards = [unlabelled.UnlabelledBatches(TEXTS, ENCODE, batch_size=13, seed=5, shard_index=s,
                                         shard_count=2) for s in range(2)]
  rows = [next(s)['unlabelled_index'] for s in shards]
  assert sorted(np.concatenate(rows).tolist()) == list(range(len(TEXTS)))
  assert not any(k.startswith(unlabelled.AUGMENTED) for k in next(shards[0]))


# ---- The loss term in the train step ----------------------------------------------------------

NUM_CLASSES = 5
MODEL = TransformerConfig(
    family='bert', vocab_size=64, num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=2,
    head_dim=16, mlp_dim=64, max_positions=16, type_vocab_size=2, dropout_rate=0.1)


def _tokens(rng, rows: int, length: int = 8) -> dict[str, np.ndarray]:
  mask = np.arange(length) < rng.integers(2, length + 1, rows)[:, None]
  return {'tokens': (rng.integers(1, MODEL.vocab_size, (rows, length)) * mask).astype(np.int32),
          'padding_mask': mask, 'token_types': np.zeros((rows, length), np.int32)}


def _batch(step: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(step)
  batch = {**_tokens(rng, 4), 'labels': rng.integers(0, NUM_CLASSES, 4).astype(np.int32),
           'weights': np.ones(4, np.float32)}
  for prefix in (unlabelled.CLEAN, unlabelled.AUGMENTED):
    batch.update({prefix + k: v for k, v in _tokens(rng, 8).items()})
  return batch


def _train(loss_fns, steps: int = 2):
  """For each loss, (per-step metric sums, final params) of `steps` train steps from the same
  initial state."""
  tx = optax.adam(1e-2)
  graphdef, init = state_lib.init_fn(
      lambda rngs: SequenceClassifier(MODEL, NUM_CLASSES, pooling='mean', rngs=rngs), tx, seed=0)
  initial = jax.jit(init)()
  runs = []
  for loss_fn in loss_fns:
    train_step = jax.jit(step_lib.make_train_step(graphdef, tx, loss_fn, seed=0))
    state, metrics = initial, []
    for step in range(steps):
      state, sums = train_step(state, _batch(step))
      metrics.append(jax.device_get(sums))
    runs.append((metrics, jax.device_get(state.params)))
  return runs


def test_zero_weight_trains_exactly_as_without_the_term():
  """At weight 0 the term is computed (and logged) but changes nothing: the same losses and
  bitwise the same parameters as the plain cross entropy, dropout included. Every row passes
  the confidence test at 0, so the term is really there."""
  plain = classification_task._loss_fn(0.0)
  config = ConsistencyConfig(weight=0.0, temperature=1.0, confidence=0.0, stream=None)
  zero = make_loss_fn(config, classification_task.classifier_logits, 0.0)
  (plain_metrics, plain_params), (zero_metrics, zero_params) = _train((plain, zero))
  for want, got in zip(plain_metrics, zero_metrics):
    np.testing.assert_array_equal(got['loss'], want['loss'])
    np.testing.assert_array_equal(got['objective'], want['loss'])
    assert float(got['consistency'][0]) > 0  # a KL between two different views
    assert float(got['consistency_kept'][0]) == float(got['consistency_kept'][1]) == 8
  for want, got in zip(jax.tree.leaves(plain_params), jax.tree.leaves(zero_params), strict=True):
    np.testing.assert_array_equal(got, want)


def _linear(weights, batch, rngs=None):
  """A linear classifier of the token ids: enough model to check the loss's arithmetic."""
  del rngs
  return batch['tokens'].astype(np.float32) @ weights  # [B, T] @ [T, C] -> [B, C]


def test_the_term_is_the_mean_kl_over_confident_rows_added_with_its_weight():
  """objective = CE + weight * (KL sum / rows kept), recomputed in float64 from the logits;
  the confidence threshold is set between the rows' clean confidences, so the mask is
  exercised."""
  batch = _batch(0)
  weights = np.random.default_rng(0).normal(0, 0.05, (8, NUM_CLASSES)).astype(np.float32)
  labelled, clean, augmented = (_linear(weights, b).astype(np.float64) for b in (
      batch, unlabelled.view(batch, unlabelled.CLEAN),
      unlabelled.view(batch, unlabelled.AUGMENTED)))
  confidence = float(np.median(np.max(_softmax(clean), axis=-1)))
  config = ConsistencyConfig(weight=2.5, temperature=0.5, confidence=confidence, stream=None)
  objective, n, sums = jax.jit(make_loss_fn(config, _linear, 0.0))(weights, batch, None)

  target = _softmax(clean / 0.5)
  kl = np.sum(target * (np.log(target) - np.log(_softmax(augmented))), axis=-1)
  kept = np.max(_softmax(clean), axis=-1) >= confidence
  assert 0 < kept.sum() < 8
  term = kl[kept].mean()
  cross_entropy = -np.mean(np.log(_softmax(labelled))[np.arange(4), batch['labels']])
  # float32 against float64 over a handful of sums of C terms: 1e-5 relative is ~100 eps32.
  np.testing.assert_allclose(sums['consistency'][0], term, rtol=1e-5)
  np.testing.assert_allclose(float(sums['consistency_kept'][0]), kept.sum())
  np.testing.assert_allclose(float(objective / n), cross_entropy + 2.5 * term, rtol=1e-5)


def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


# ---- Config checks, and a tiny fine-tune ------------------------------------------------------

def _config(**fields):
  config = load_config('finetune', 'tiny')
  config.data.shots_per_class = 2
  config.consistency.weight = 1.0
  config.consistency.update(fields)
  return config


def test_off_by_default_and_checked_when_on(tmp_path):
  assert ConsistencyConfig.from_config(load_config('finetune', 'tiny')) is None
  assert ConsistencyConfig.from_config(load_config('finetune', 'tiny,task=lm')) is None
  on = ConsistencyConfig.from_config(_config(unlabelled_batch_size=96))
  assert (on.weight, on.temperature, on.confidence) == (1.0, 0.4, 0.8)
  assert (on.stream.source, on.stream.batch_size, on.stream.ratio) == ('rest', 96, 3)
  assert [op.name for op in on.stream.augment.operations] == ['synonym', 'delete']


@pytest.mark.parametrize('fields, error', [
    ({'weight': -1.0}, r'config\.consistency\.weight=-1\.0 must be a number >= 0'),
    ({'temperature': 0.0}, r'config\.consistency\.temperature=0\.0 must be a number > 0'),
    ({'confidence': 1.5}, r'config\.consistency\.confidence=1\.5 must be a number in \[0, 1\]'),
    ({'augment': ('delete:0.1', 'swp:0.1')},
     r"config\.consistency\.augment\[1\]='swp:0\.1': unknown operation 'swp'"),
    ({'augment': ()}, r'config\.consistency\.augment=\(\): consistency training needs'),
    ({'source': '/no/such/file.txt'},
     r"config\.consistency\.source='/no/such/file\.txt': no such file"),
    ({'source': ''}, r"config\.consistency\.source='': give 'rest'"),
    ({'unlabelled_batch_size': 48},
     r'unlabelled_batch_size=48 must be a positive multiple of config\.train\.batch_size=32'),
])
def test_bad_settings_are_one_line_errors_naming_the_field(fields, error):
  with pytest.raises(ValueError, match=error) as raised:
    ConsistencyConfig.from_config(_config(**fields))
  assert '\n' not in str(raised.value)


def test_rest_needs_a_few_shot_cut_and_the_stage_fails_before_writing(tmp_path):
  from llmopt_jax.stages import finetune
  config = _config()
  config.data.shots_per_class = 0
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=r"config\.consistency\.source='rest' needs "
                                       r'config\.data\.shots_per_class > 0'):
    finetune.run(config, str(workdir))
  assert not workdir.exists()


@pytest.mark.parametrize('name, content', [
    ('texts.txt', 'first text\n\n  second text  \n'),
    ('texts.csv', 'id,text\n1,first text\n2,"second text"\n'),
    ('texts.jsonl', '{"text": "first text"}\n\n{"text": "second text", "id": 2}\n'),
])
def test_source_files_give_their_texts(tmp_path, name, content):
  path = tmp_path / name
  path.write_text(content, encoding='utf-8')
  assert unlabelled.read_texts(str(path), 'text', 'config.consistency.source') == (
      'first text', 'second text')


def test_a_source_without_the_text_field_names_it(tmp_path):
  path = tmp_path / 'texts.csv'
  path.write_text('id,body\n1,first text\n', encoding='utf-8')
  with pytest.raises(ValueError, match=r"config\.consistency\.source=.*texts\.csv': no column "
                                       r"'text' \(config\.data\.text_field\); available"):
    unlabelled.read_texts(str(path), 'text', 'config.consistency.source')


def test_tiny_finetune_with_consistency_on_the_unlabelled_rest(tiny_bert_dir, tmp_path):
  """configs/finetune.py:tiny at 2 shots per class with the term on (every row kept):
  a few steps end to end, the term logged, the unlabelled position checkpointed."""
  from llmopt_jax.stages import finetune
  config = _config(confidence=0.0, unlabelled_batch_size=64)
  config.init.model = tiny_bert_dir
  config.train.update(num_steps=2, eval_every=2, eval_batches=1, log_every=1)
  config.checkpoint.every_steps = 2
  config.test_batches = 1
  config.export = False
  finetune.run(config, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl', encoding='utf-8') as f:
    records = [json.loads(line) for line in f if '"train/loss"' in line]
  assert [r['step'] for r in records] == [1, 2]
  for record in records:
    assert record['train/consistency'] > 0 and record['train/consistency_kept'] == 1.0
    assert record['train/objective'] == pytest.approx(
        record['train/loss'] + record['train/consistency'], rel=1e-6)
  checkpoints = Checkpoints(str(tmp_path / 'checkpoints'), keep_last=100, keep_best=0,
                            best_metric='eval/loss', best_mode='min')
  try:
    shards = checkpoints.restore_progress(2)['data'][0]['shards']
  finally:
    checkpoints.close()
  assert [s['unlabelled'] for s in shards] == [{'epoch': 0, 'position': 128}]  # 2 x 64 rows

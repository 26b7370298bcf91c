"""Distillation on a transfer set (llmopt_jax/distill/transfer.py): the objective with transfer
rows against the plain one, the rows' weights, where the rows come from, the teacher's
few-shot cut (llmopt_jax/distill/teacher_labels.py), and the one-line refusals.

The objective runs forward only, on a 2-layer BERT teacher and a 1-layer student small enough
to compile in seconds; the plain and the transfer objective compile once each for the file.
"""

import jax
import numpy as np
import pytest
from flax import nnx

import tolerances
from conftest import load_config
from llmopt_jax import classification_metrics
from llmopt_jax.data import unlabelled
from llmopt_jax.distill import objective, student_task, teacher_labels, transfer
from llmopt_jax.distill.student import DistillStudent
from llmopt_jax.models.config import TransformerConfig
from llmopt_jax.models.heads import SequenceClassifier
from llmopt_jax.tasks import classification, finished, problem
from llmopt_jax.train import step as step_lib

NUM_CLASSES, ROWS, LENGTH = 5, 8, 8
TEACHER = TransformerConfig(
    family='bert', vocab_size=64, num_layers=2, embed_dim=32, num_heads=2, num_kv_heads=2,
    head_dim=16, mlp_dim=64, max_positions=16, type_vocab_size=2)
STUDENT = TEACHER.replace(num_layers=1)  # same width: the hidden term needs no projection
IO = objective.ModelIO(  # the classification problem's, as `tasks.problem` builds it
    forward=problem.classify,
    hard_metrics=lambda logits, batch: classification_metrics.classification_sums(
        logits, batch['labels'], batch['weights'], confusion=False),
    kd_weights=lambda batch: batch['weights'],
    token_weights=lambda batch: batch['padding_mask'])


def _inputs(seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  mask = np.arange(LENGTH) < rng.integers(2, LENGTH + 1, ROWS)[:, None]
  return {'tokens': (rng.integers(1, TEACHER.vocab_size, (ROWS, LENGTH)) * mask).astype(np.int32),
          'padding_mask': mask, 'token_types': np.zeros((ROWS, LENGTH), np.int32)}


def _labelled(seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed + 100)
  return {**_inputs(seed), 'labels': rng.integers(0, NUM_CLASSES, ROWS).astype(np.int32),
          'weights': np.ones(ROWS, np.float32)}


def _with_transfer(batch: dict, rows: dict) -> dict:
  return {**batch, **{unlabelled.CLEAN + k: v for k, v in rows.items()}}


def _spec(transfer_source: str) -> objective.DistillConfig:
  d = load_config('distill', 'tiny').distill
  d.update(mode='online', transfer=transfer_source, hidden_weight=1.0, attention_weight=1.0)
  return objective.DistillConfig.from_config(d, 10, STUDENT.num_layers, TEACHER.num_layers)


@pytest.fixture(scope='module')
def objectives():
  """(plain, with transfer rows): jitted (batch) -> (objective, n, sums) at step 0."""
  split = lambda build: (nnx.graphdef(nnx.eval_shape(build)),  # noqa: E731
                         jax.jit(lambda: nnx.state(build(), nnx.Param))())
  teacher = split(lambda: SequenceClassifier(TEACHER, NUM_CLASSES, pooling='mean',
                                             rngs=nnx.Rngs(0)))
  student = split(lambda: DistillStudent(
      SequenceClassifier(STUDENT, NUM_CLASSES, pooling='mean', rngs=nnx.Rngs(1)),
      student_dim=32, teacher_dim=32, num_projections=1, rngs=nnx.Rngs(1)))

  def make(spec):
    loss_fn = objective.make_loss_fn(spec, IO, teacher[0])
    run = jax.jit(lambda params, batch, constants: loss_fn(
        nnx.merge(student[0], params), batch, None,
        step_lib.LossContext(np.int32(0), constants)))
    return lambda batch: jax.device_get(run(student[1], batch, teacher[1]))
  return make(_spec('')), make(_spec('rest'))


def _mean(pair) -> float:
  return float(pair[0]) / float(pair[1])


def test_transfer_rows_of_the_training_texts_give_the_plain_objective(objectives):
  """Augmentation off, the transfer set is the training texts themselves: every row counted
  twice in each distillation term changes no mean, so the objective is plain distillation."""
  plain, with_rows = objectives
  batch = _labelled(0)
  want, got = plain(batch), with_rows(_with_transfer(batch, _inputs(0)))
  assert _mean(want[2]['kd_loss']) > 1e-5  # a teacher term to agree on
  # The same per-row values summed over twice the rows: the sums' rounding, over the
  # student's and teacher's forward paths, the C classes and the 2B rows (or their tokens).
  paths = tolerances.forward_terms(TEACHER, LENGTH) + tolerances.forward_terms(STUDENT, LENGTH)
  rtol = tolerances.sum_tolerance(paths + 2 * NUM_CLASSES + 2 * ROWS * LENGTH, 1.0)
  np.testing.assert_allclose(got[0] / got[1], want[0] / want[1], rtol=rtol)
  for name in ('loss', 'kd_loss', 'hidden_loss', 'attention_loss'):
    np.testing.assert_allclose(_mean(got[2][name]), _mean(want[2][name]), rtol=rtol, err_msg=name)


def test_transfer_rows_carry_zero_label_weight_and_full_distillation_weight(objectives):
  """With other texts as transfer rows: the hard-label loss is the labelled rows' alone, and
  KD is the mean over the labelled and the transfer rows, each counted once."""
  plain, with_rows = objectives
  batch, rows = _labelled(1), _inputs(2)
  labelled_only, transfer_only = plain(batch), plain({**rows, **{
      k: batch[k] for k in ('labels', 'weights')}})
  got = with_rows(_with_transfer(batch, rows))
  paths = tolerances.forward_terms(TEACHER, LENGTH) + tolerances.forward_terms(STUDENT, LENGTH)
  rtol = tolerances.sum_tolerance(paths + 2 * NUM_CLASSES + 2 * ROWS * LENGTH, 1.0)
  assert float(got[1]) == ROWS  # the step divides by the labelled rows' weight
  assert float(got[2]['loss'][1]) == float(got[2]['accuracy'][1]) == ROWS
  np.testing.assert_allclose(_mean(got[2]['loss']), _mean(labelled_only[2]['loss']), rtol=rtol)
  assert float(got[2]['kd_loss'][1]) == 2 * ROWS
  kd_sum = labelled_only[2]['kd_loss'][0] + transfer_only[2]['kd_loss'][0]
  np.testing.assert_allclose(got[2]['kd_loss'][0], kd_sum, rtol=rtol)
  tokens = batch['padding_mask'].sum() + rows['padding_mask'].sum()
  assert float(got[2]['hidden_loss'][1]) == tokens  # token terms cover both kinds of rows
  alpha = float(got[2]['alpha'][0])
  hard_and_kd = (1 - alpha) * _mean(got[2]['loss']) + alpha * kd_sum / (2 * ROWS)
  rest = _mean(got[2]['hidden_loss']) + _mean(got[2]['attention_loss'])
  np.testing.assert_allclose(got[0] / got[1], hard_and_kd + rest, rtol=rtol)


def test_appended_rows_have_label_weight_zero_and_kd_weight_one():
  batch = _with_transfer(_labelled(0), _inputs(3))
  combined, kd_weights = transfer.with_transfer_rows(batch, batch['weights'])
  for key in ('tokens', 'padding_mask', 'token_types'):
    np.testing.assert_array_equal(combined[key][ROWS:], batch[unlabelled.CLEAN + key])
    np.testing.assert_array_equal(combined[key][:ROWS], batch[key])
  np.testing.assert_array_equal(combined['weights'], [1] * ROWS + [0] * ROWS)
  np.testing.assert_array_equal(combined['labels'][ROWS:], 0)
  np.testing.assert_array_equal(kd_weights, np.ones(2 * ROWS))


def _config(**distill):
  config = load_config('distill', 'tiny')
  config.data.shots_per_class = 2
  config.distill.update(transfer='rest', transfer_batch_size=64, **distill)
  return config


def test_transfer_rows_come_from_the_rest_of_the_few_shot_split(tiny_bert_dir):
  config = _config()
  config.init.model = tiny_bert_dir
  built = classification.fine_tuning(config, None)
  batch = next(built.task.train_data)
  assert batch['tokens'].shape[0] == 32 and batch['unlabelled_tokens'].shape[0] == 64
  assert not any(key.startswith(unlabelled.AUGMENTED) for key in batch)  # the clean view only
  texts = [built.unlabelled.texts[i] for i in batch['unlabelled_index']]
  np.testing.assert_array_equal(batch['unlabelled_tokens'], built.encode(texts)[0])
  assert not set(texts) & set(built.splits['train'].texts)  # none is a labelled example
  assert built.task.train_data.get_state()['shards'][0]['unlabelled'] == {
      'epoch': 0, 'position': 64}


@pytest.mark.parametrize('change, error', [
    ({'distill.mode': 'cached', 'distill.transfer': '', 'data.augment': ('swap:0.1',)},
     r"config\.data\.augment=\('swap:0\.1',\) needs config\.distill\.mode=online"),
    ({'distill.mode': 'cached'},
     r"config\.distill\.transfer='rest' needs mode=online: the cached teacher"),
    ({'data.shots_per_class': 0},
     r"config\.distill\.transfer='rest' needs config\.data\.shots_per_class > 0"),
    ({'distill.transfer': '/no/such.txt'}, r"config\.distill\.transfer='/no/such\.txt': no such"),
    ({'distill.transfer_batch_size': 48},
     r'config\.distill\.transfer_batch_size=48 must be a positive multiple'),
    ({'consistency.weight': 1.0}, r'config\.consistency\.weight=1\.0: the students of a '),
    ({'teacher.shots_per_class': -2}, r'config\.teacher\.shots_per_class=-2 must be -1'),
])
def test_bad_settings_fail_in_one_line_before_the_workdir_is_written(tmp_path, change, error):
  from llmopt_jax.stages import distill
  config = _config()
  for path, value in change.items():
    section, name = path.split('.')
    config[section][name] = value
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=error) as raised:
    distill.run(config, str(workdir))
  assert '\n' not in str(raised.value)
  assert not workdir.exists()


def test_transfer_is_refused_for_language_models_and_beside_consistency_training():
  config = load_config('distill', 'tiny,task=lm')
  config.distill.transfer = 'rest'
  with pytest.raises(ValueError, match=r'config\.distill\.transfer=.*for the classification'):
    student_task.check_fields(config)
  config = _config()
  config.consistency.weight = 1.0
  with pytest.raises(ValueError, match=r'config\.consistency\.weight and config\.distill\.'
                                       r'transfer both read unlabelled text'):
    classification.unlabelled_options(config)


def test_the_teacher_gets_the_students_cut_unless_told_otherwise():
  config = _config()
  config.seed = 3
  assert config.teacher.shots_per_class == -1
  teacher = teacher_labels.teacher_config(config)
  assert (teacher.data.shots_per_class, teacher.data.shots_seed) == (2, 3)
  assert config.teacher.config.data.shots_per_class == 0  # derived, not patched in place
  config.teacher.shots_per_class = 0  # TinyBERT's setting: the whole split
  assert teacher_labels.teacher_config(config).data.shots_per_class == 0
  config.teacher.shots_per_class = 5  # more shots, same seed: a superset of the students'
  more = teacher_labels.teacher_config(config).data
  assert (more.shots_per_class, more.shots_seed) == (5, 3)


def test_a_finished_teacher_on_another_cut_is_named():
  config = _config()
  trained_on = lambda teacher_config: finished.FinishedModel(  # noqa: E731
      workdir='runs/t', card=None, config=teacher_config, step=0, graphdef=None, params=None)
  teacher_labels.check_teacher(config, trained_on(teacher_labels.teacher_config(config)))
  with pytest.raises(ValueError, match=r'config\.teacher\.shots_per_class=-1 asks for a teacher '
                                       r'trained on 2 examples per class \(seed 0\), but the one '
                                       r'in runs/t saw the whole training split'):
    teacher_labels.check_teacher(config, trained_on(config.teacher.config))

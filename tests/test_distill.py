"""The distillation objective and stage: online equals cached, the intermediate terms, the
teacher never touched, sharded equals one device, and configs/distill.py:tiny end to end.

The pure loss functions are tested in test_distill_losses.py; here they meet models, the
spine's train step and the stage. The end-to-end runs are the file's cost, so the
classification one is shared by every test that reads its workdir.
"""

import hashlib
import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tolerances
from conftest import load_config, restore_state, tiny_bert
from llmopt_jax import classification_metrics, configlib, optim, sharding, stages
from llmopt_jax.data import intents
from llmopt_jax.distill import few_shot_pair, losses, objective, student_task
from llmopt_jax.distill.student import DistillStudent
from llmopt_jax.models.config import TransformerConfig
from llmopt_jax.models.heads import SequenceClassifier
from llmopt_jax.stages import distill, ptq
from llmopt_jax.tasks import finished, problem
from llmopt_jax.train import state as state_lib
from llmopt_jax.train.checkpoint import Checkpoints
from llmopt_jax.train import step as step_lib

NUM_CLASSES = 5
# A 2-layer BERT teacher small enough that every jit below compiles in seconds on a CPU.
TEACHER = TransformerConfig(
    family='bert', vocab_size=64, num_layers=2, embed_dim=32, num_heads=2, num_kv_heads=2,
    head_dim=16, mlp_dim=64, max_positions=16, type_vocab_size=2)
# A 1-layer student of half the teacher's width: hidden states need a projection.
NARROW = TEACHER.replace(num_layers=1, embed_dim=16, head_dim=8, mlp_dim=32)


# ---- Models, batches and losses without the stage ---------------------------------------------

def _classifier(config: TransformerConfig, seed: int = 0) -> SequenceClassifier:
  return SequenceClassifier(config, NUM_CLASSES, pooling='mean', rngs=nnx.Rngs(seed))


def _student(config: TransformerConfig, num_projections: int,
             rngs: nnx.Rngs | None = None) -> DistillStudent:
  rngs = rngs or nnx.Rngs(1)
  return DistillStudent(
      SequenceClassifier(config, NUM_CLASSES, pooling='mean', rngs=rngs),
      student_dim=config.embed_dim, teacher_dim=TEACHER.embed_dim,
      num_projections=num_projections, rngs=rngs)


def _split(build) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, params) of the module `build()` makes, initialised under jit: eagerly, each
  random initialiser would compile on its own, which dominates a CPU test."""
  graphdef = nnx.graphdef(nnx.eval_shape(build))
  return graphdef, jax.jit(lambda: nnx.state(build(), nnx.Param))()


def _batch(seed: int = 0, rows: int = 8, length: int = 8) -> dict[str, np.ndarray]:
  """A classification batch as `classification.eval_batches` makes them: right padding, and
  a last row of weight 0 (the padding row of a final partial batch)."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, length + 1, rows)
  padding_mask = (np.arange(length) < lengths[:, None]).astype(np.int32)
  weights = np.ones(rows, np.float32)
  weights[-1] = 0.0
  return {
      'tokens': (rng.integers(1, TEACHER.vocab_size, (rows, length)) * padding_mask
                 ).astype(np.int32),
      'token_types': np.zeros((rows, length), np.int32),
      'padding_mask': padding_mask,
      'labels': rng.integers(0, NUM_CLASSES, rows).astype(np.int32),
      'weights': weights,
  }


# The classification problem's ModelIO, as `tasks.problem` builds it.
IO = objective.ModelIO(
    forward=problem.classify,
    hard_metrics=lambda logits, batch: classification_metrics.classification_sums(
        logits, batch['labels'], batch['weights'], confusion=False),
    kd_weights=lambda batch: batch['weights'],
    token_weights=lambda batch: batch['padding_mask'])


def _spec(num_student_layers: int, num_teacher_layers: int = TEACHER.num_layers,
          **fields) -> objective.DistillConfig:
  """`config.distill` of configs/distill.py:tiny with `fields` changed, checked and built."""
  d = load_config('distill', 'tiny').distill
  d.update(fields)
  return objective.DistillConfig.from_config(d, 10, num_student_layers, num_teacher_layers)


def _objective(spec, graphdef, teacher_graphdef):
  """Jitted (student params, batch, teacher params) -> (objective, metric sums), as the train
  step computes them at step 0 without dropout."""
  loss_fn = objective.make_loss_fn(spec, IO, teacher_graphdef)

  def mean(params, batch, teacher_params):
    total, n, sums = loss_fn(nnx.merge(graphdef, params), batch, None,
                             step_lib.LossContext(jnp.int32(0), teacher_params))
    return total / n, sums
  return mean


def _loss_and_grads(spec, student, teacher, batch):
  """(objective, metric sums, gradients w.r.t. the student's params); `student` and
  `teacher` are (graphdef, params)."""
  mean = _objective(spec, student[0], teacher[0])
  (value, sums), grads = jax.jit(jax.value_and_grad(mean, has_aux=True))(
      student[1], batch, teacher[1])
  return value, sums, grads


def _mean(sums, name) -> float:
  total, count = sums[name]
  assert float(count) > 0, name
  return float(total) / float(count)


def test_cached_teacher_with_every_class_gives_the_online_objective_and_gradients():
  teacher = _split(lambda: _classifier(TEACHER))
  student = _split(lambda: _student(NARROW, num_projections=0))
  batch = _batch()

  @jax.jit
  def top_logits(params, batch):  # what the stage's teacher cache stores, with k = C
    return losses.topk(IO.forward(nnx.merge(teacher[0], params), batch)[0], NUM_CLASSES)
  values, indices = top_logits(teacher[1], batch)
  cached_batch = {**batch, 'teacher_values': values, 'teacher_indices': indices}

  online = _loss_and_grads(_spec(1, mode='online'), student, teacher, batch)
  cached = _loss_and_grads(_spec(1, mode='cached', top_k=NUM_CLASSES), student, teacher,
                           cached_batch)
  assert _mean(online[1], 'kd_loss') > 1e-4  # the teacher term is there to agree on
  # The cached path has the same teacher logits, sorted: its log-softmax and KL add the C
  # classes in another order, and the two programs may round the student's forward pass (and
  # back) otherwise. The teacher's own rounding hardly counts: it enters the KL through
  # log(p / q), near 0 for these two models, so first order in it is nearly nothing.
  student_path = tolerances.forward_terms(NARROW, batch['tokens'].shape[1])
  terms = 2 * NUM_CLASSES + len(batch['labels']) + student_path
  np.testing.assert_allclose(cached[0], online[0], rtol=tolerances.sum_tolerance(terms, 1.0))
  # The KD term is small, so it gets its own bound: T^2 times the 2C-term sums of terms whose
  # absolute values add up to a cross-entropy, about log C.
  temperature = float(_spec(1).temperature(0))  # the step-0 value the losses used
  np.testing.assert_allclose(
      _mean(cached[1], 'kd_loss'), _mean(online[1], 'kd_loss'),
      atol=temperature**2 * tolerances.sum_tolerance(2 * NUM_CLASSES, np.log(NUM_CLASSES)))
  assert jax.tree.structure(cached[2]) == jax.tree.structure(online[2])
  wants = jax.tree.leaves(online[2])
  bounds = tolerances.gradient_tolerances(wants, terms + student_path)  # backward: the path again
  for got, want, bound in zip(jax.tree.leaves(cached[2]), wants, bounds, strict=True):
    np.testing.assert_allclose(got, want, rtol=0, atol=bound)


def test_hidden_and_attention_terms_vanish_for_the_teacher_itself():
  """Student = teacher (same blocks, same values, identity layer map, no projection): every
  distillation term is 0; another student of the same shape makes them positive."""
  spec = _spec(TEACHER.num_layers, mode='online', hidden_weight=1.0, attention_weight=1.0)
  assert spec.layer_map == (1, 2)
  teacher = _split(lambda: _classifier(TEACHER))
  graphdef, params = _split(lambda: _student(TEACHER, num_projections=len(spec.layer_map)))
  assert 'projections' not in params  # widths agree: nothing to project
  # Values only: a forward pass compiles in a fraction of the time of its gradient.
  forward = jax.jit(_objective(spec, graphdef, teacher[0]))
  batch = _batch()
  _, sums = forward(nnx.State({'student': teacher[1]}), batch, teacher[1])
  # The two forward passes are the same arithmetic on the same values. Were they rounded
  # apart (by eps32 * path, 1e-4 relative at most), KL, MSE and the attention KL vanish to
  # second order in that: below 1e-8, hence 1e-7.
  for name in ('kd_loss', 'hidden_loss', 'attention_loss'):
    assert abs(_mean(sums, name)) < 1e-7, name
  # What is left of the objective is the hard-label term, weighted 1 - alpha: a few roundings
  # (1 - alpha, the product, the sums with zeros), each half an ulp; 1e-6 is 8 eps32.
  np.testing.assert_allclose(_mean(sums, 'objective'), (1 - 0.7) * _mean(sums, 'loss'),
                             rtol=1e-6)

  # The same computation for another student of that shape (no new compilation).
  _, sums = forward(params, batch, teacher[1])
  for name in ('kd_loss', 'hidden_loss', 'attention_loss'):  # far above the 1e-7 of rounding
    assert _mean(sums, name) > 1e-5, name


def test_projection_to_the_teacher_width_learns_through_the_hidden_term():
  spec = _spec(NARROW.num_layers, mode='online', hidden_weight=1.0)
  student = _split(lambda: _student(NARROW, num_projections=len(spec.layer_map)))
  teacher = _split(lambda: _classifier(TEACHER))
  _, sums, grads = _loss_and_grads(spec, student, teacher, _batch())
  assert _mean(sums, 'hidden_loss') > 0
  projection_grads = jax.tree.leaves(grads['projections'])
  assert len(projection_grads) == len(spec.layer_map)
  for g in projection_grads:
    assert g.shape == (NARROW.embed_dim, TEACHER.embed_dim)
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


# ---- The spine's train step with the teacher as constants, on 1 and 8 devices ------------------

NUM_STEPS = 3


def _train_on(mesh_config, devices=None):
  """Losses, final student params and the teacher's arrays (before and after) of NUM_STEPS
  jitted distillation steps, the teacher placed on the mesh as the loop places constants."""
  mesh, rules = sharding.from_config(mesh_config, devices)
  config = load_config('distill', 'tiny')
  spec = _spec(NARROW.num_layers, mode='online', alpha=0.5, alpha_end=0.5, temperature=2.0,
               temperature_end=2.0, hidden_weight=1.0)
  build_teacher = lambda: nnx.state(_classifier(TEACHER), nnx.Param)  # noqa: E731
  abstract = jax.eval_shape(build_teacher)
  teacher = jax.jit(build_teacher,
                    out_shardings=sharding.tree_shardings(abstract, mesh, rules))()
  teacher_before = [np.array(x) for x in jax.tree.leaves(teacher)]

  tx = optim.make_optimizer(optim.OptimConfig.from_config(config.optim), NUM_STEPS)
  graphdef, init = state_lib.init_fn(
      lambda rngs: _student(NARROW, len(spec.layer_map), rngs=rngs), tx, seed=1)
  _, shardings = state_lib.abstract_and_shardings(init, mesh, rules)
  state = state_lib.initialize(init, shardings)
  teacher_graphdef = nnx.graphdef(nnx.eval_shape(lambda: _classifier(TEACHER)))
  train_step = step_lib.make_train_step(
      graphdef, tx, objective.make_loss_fn(spec, IO, teacher_graphdef), seed=0)
  eval_step = step_lib.make_eval_step(graphdef, lambda model, batch: {})
  train_step, _ = step_lib.jit_steps(
      train_step, eval_step, shardings, mesh, rules,
      constants_shardings=jax.tree.map(lambda a: a.sharding, teacher))
  objectives = []
  for i in range(NUM_STEPS):
    state, metrics = train_step(state, sharding.shard_batch(_batch(i), mesh, rules), teacher)
    objectives.append(metrics['objective'][0] / metrics['objective'][1])
    assert float(metrics['hidden_loss'][1]) > 0
  return types.SimpleNamespace(
      objectives=np.asarray(objectives), mesh=mesh,
      params=[np.asarray(p) for p in jax.tree.leaves(state.params)],
      teacher=teacher, teacher_before=teacher_before)


@pytest.fixture(scope='module')
def one_device():
  return _train_on(configlib.mesh('data'), jax.devices()[:1])


@pytest.fixture(scope='module')
def eight_devices():
  mesh_config = configlib.mesh('fsdp')
  mesh_config.shape = {'data': 2, 'fsdp': 4, 'tensor': 1}
  return _train_on(mesh_config)


def test_sharded_distillation_matches_one_device(one_device, eight_devices):
  assert eight_devices.mesh.size == 8 and one_device.mesh.size == 1
  # The teacher is split too: the 8-device run is not a replicated copy of the 1-device one.
  assert not all(x.sharding.is_fully_replicated for x in jax.tree.leaves(eight_devices.teacher))
  # Sharded sums add in another order. The objective sums over the batch's tokens and the
  # hidden states' width what both models' forward paths computed.
  batch = _batch()
  paths = (tolerances.forward_terms(TEACHER, batch['tokens'].shape[1])
           + tolerances.forward_terms(NARROW, batch['tokens'].shape[1]))
  sums = batch['tokens'].size + TEACHER.embed_dim
  np.testing.assert_allclose(eight_devices.objectives, one_device.objectives,
                             rtol=tolerances.sum_tolerance(sums + paths, 1.0))
  schedule = optim.make_schedule(load_config('distill', 'tiny').optim, NUM_STEPS)
  tolerances.assert_adam_params_close(
      eight_devices.params, one_device.params, sum(float(schedule(t)) for t in range(NUM_STEPS)),
      sums + 2 * paths)


def test_train_steps_leave_the_teacher_bitwise_unchanged(one_device, eight_devices):
  for run in (one_device, eight_devices):
    after = jax.tree.leaves(run.teacher)
    assert len(after) == len(run.teacher_before)
    for got, want in zip(after, run.teacher_before, strict=True):
      assert not got.is_deleted()  # constants are not donated with the state
      np.testing.assert_array_equal(np.asarray(got), want)


# ---- The stage: configs/distill.py:tiny, shrunk ---------------------------------------------

def _shrink(config, num_steps: int) -> None:
  config.train.update(num_steps=num_steps, eval_every=num_steps, eval_batches=1)
  config.checkpoint.every_steps = 2


def _tree_digest(directory) -> dict[str, str]:
  digests = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        digests[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return digests


@pytest.fixture(scope='module')
def classification_run(tmp_path_factory):
  """configs/distill.py:tiny (cached teacher, label-only baseline) on a tiny BERT, 2 steps.

  The teacher is trained first, as the stage itself would, so its files can be fingerprinted
  before the students train; the stage then finds it finished and reuses it.
  """
  root = tmp_path_factory.mktemp('distill')
  start = tiny_bert(str(root / 'bert'))
  workdir = root / 'run'
  config = load_config('distill', 'tiny')
  config.init.model = config.teacher.config.init.model = start
  config.test_batches = config.teacher.config.test_batches = 1
  config.teacher.config.export = False  # the Hugging Face copy plays no part here
  config.student.num_layers = 1         # of the teacher's 2
  _shrink(config.teacher.config, 2)
  _shrink(config, 2)
  config.distill.mode = 'cached'         # Banking77's default (tiny runs online)
  config.few_shot_pair.num_steps = 2     # the second pair: 10 shots, online, transfer set
  assert config.distill.baseline and config.few_shot_pair.shots_per_class == 10
  stages.run(config.teacher.config, str(workdir / 'teacher'))
  teacher_files = _tree_digest(workdir / 'teacher')
  report = distill.run(config, str(workdir))
  return types.SimpleNamespace(config=config, workdir=workdir, report=report,
                               teacher_files=teacher_files)


def _rows(report: dict) -> dict[str, dict]:
  return {row['model']: row for row in report['rows']}


def test_tiny_run_writes_a_report_of_teacher_and_both_students(classification_run):
  workdir = classification_run.workdir
  with open(workdir / 'report.json', encoding='utf-8') as f:
    report = json.load(f)
  rows = _rows(report)
  assert list(rows) == ['teacher', 'student_labels', 'student_kd', 'student_labels_10shot',
                        'student_kd_10shot']
  for name, row in rows.items():
    for column in ('params', 'bytes', 'accuracy', 'macro_f1', 'latency_ms_b1',
                   'latency_ms_b64'):
      assert np.isfinite(row[column]), (name, column)
    assert 0 <= row['accuracy'] <= 1 and 0 <= row['macro_f1'] <= 1
    assert row['latency_ms_b1'] > 0 and row['latency_ms_b64'] > 0
    assert row['bytes'] == 4 * row['params']  # float32
  assert len({rows[name]['params'] for name in rows if name != 'teacher'}) == 1
  assert rows['student_kd']['params'] < rows['teacher']['params']
  text = (workdir / 'report.md').read_text()
  assert all(name in text for name in rows)


def test_a_student_quantizes_from_its_own_directory_once_its_teacher_is_gone(
    classification_run, tmp_path):
  """A distilled student is loaded from its own model card and checkpoints: with the
  teacher's workdir deleted, PTQ of the student scores its float32 copy as the distillation
  scored the student."""
  run = tmp_path / 'distill'
  shutil.copytree(classification_run.workdir, run, ignore=lambda d, names: (
      ['teacher'] if d == str(classification_run.workdir) else []))
  assert not (run / 'teacher').exists()
  config = load_config('ptq', f'tiny,source={run}')
  config.init.model = classification_run.config.init.model
  config.test_batches = classification_run.config.test_batches
  config.variants = ('int8',)
  rows = _rows(ptq.run(config, str(tmp_path / 'ptq')))
  student = _rows(classification_run.report)['student_kd']
  assert list(rows) == ['float32', 'bfloat16', 'int8 PTQ']
  assert rows['float32']['params'] == student['params']
  # The same weights on the same test batches; only the placement differs (replicated here,
  # sharded by logical axes in the distillation), which reorders float32 sums at the ulp
  # level: at most one prediction in a near tie may flip.
  examples = config.test_batches * config.train.batch_size
  assert abs(rows['float32']['accuracy'] - student['accuracy']) <= 1 / examples


def test_both_students_train_on_the_same_batches(classification_run):
  """They share one training iterator: each run must start it at the same place, so the
  comparison differs in the loss alone (and not in which batches each student saw)."""
  positions = {}
  for name in ('student_labels', 'student_kd', 'student_labels_10shot', 'student_kd_10shot'):
    checkpoints = Checkpoints(str(classification_run.workdir / name / 'checkpoints'),
                              keep_last=100, keep_best=0, best_metric='eval/loss',
                              best_mode='min')
    try:
      positions[name] = checkpoints.restore_progress(2)['data']
    finally:
      checkpoints.close()
  assert positions['student_labels'] == positions['student_kd']
  # The second pair shares its own iterator the same way: the 10-shot split, with the rest
  # of the split beside it as the transfer stream (a position the first pair has not).
  assert positions['student_labels_10shot'] == positions['student_kd_10shot']
  assert 'unlabelled' in positions['student_kd_10shot'][0]['shards'][0]
  assert 'unlabelled' not in positions['student_kd'][0]['shards'][0]


def test_distillation_leaves_the_teacher_run_unchanged(classification_run):
  assert _tree_digest(classification_run.workdir / 'teacher') == classification_run.teacher_files


def test_student_checkpoint_holds_no_teacher_tensors(classification_run):
  workdir = classification_run.workdir / 'student_kd'
  with open(workdir / 'summary.json', encoding='utf-8') as f:
    step = json.load(f)['final_step']
  state = restore_state(workdir, step)
  assert set(state['params']) <= {'student', 'projections'}
  count = sum(x.size for x in jax.tree.leaves(state['params']['student']))
  with open(classification_run.workdir / 'report.json', encoding='utf-8') as f:
    rows = _rows(json.load(f))
  assert count == rows['student_kd']['params'] < rows['teacher']['params']
  # Adam's two moments per parameter, a step and a few scalars: no room for a teacher copy.
  assert sum(x.size for x in jax.tree.leaves(state)) <= 3 * count + 16


def test_cached_teacher_has_every_class_of_every_training_example(classification_run):
  path = classification_run.workdir / 'teacher_cache'
  with open(path / 'meta.json', encoding='utf-8') as f:
    meta = json.load(f)
  data = classification_run.config.data
  num_train = len(intents.load(data.name, validation_fraction=data.validation_fraction)['train'])
  num_classes = 77  # Banking77
  assert meta['num_examples'] == num_train and meta['k'] == num_classes
  values, indices = np.load(path / 'values.npy'), np.load(path / 'indices.npy')
  assert values.shape == indices.shape == (num_train, num_classes)
  assert values.dtype == np.float32 and indices.dtype == np.int32
  assert np.all(np.diff(values, axis=1) <= 0)  # top-k order
  np.testing.assert_array_equal(np.sort(indices, axis=1),
                                np.broadcast_to(np.arange(num_classes), indices.shape))


def test_rerun_of_a_finished_distillation_only_rewrites_the_report(classification_run):
  workdir = classification_run.workdir
  trained = {name: _tree_digest(workdir / name / 'checkpoints')
             for name in ('teacher', 'student_labels', 'student_kd', 'student_labels_10shot',
                          'student_kd_10shot')}
  os.remove(workdir / 'report.json')
  os.remove(workdir / 'report.md')
  report = distill.run(classification_run.config, str(workdir))
  for name, digests in trained.items():
    assert _tree_digest(workdir / name / 'checkpoints') == digests, name
  assert (workdir / 'report.json').exists() and (workdir / 'report.md').exists()
  before, after = _rows(classification_run.report), _rows(report)
  for name in before:
    for column in ('params', 'accuracy', 'macro_f1'):
      assert after[name][column] == before[name][column], (name, column)


def test_tiny_language_model_distillation_end_to_end(tfds_dir, tmp_path):
  config = load_config('distill', 'tiny,task=lm')
  config.data.tfds_data_dir = config.teacher.config.data.tfds_data_dir = tfds_dir
  _shrink(config.teacher.config, 2)
  _shrink(config, 2)
  assert config.distill.mode == 'online'
  distill.run(config, str(tmp_path))
  assert (tmp_path / 'report.md').exists()
  with open(tmp_path / 'report.json', encoding='utf-8') as f:
    rows = _rows(json.load(f))
  assert list(rows) == ['teacher', 'student_labels', 'student_kd']
  for name, row in rows.items():
    assert np.isfinite(row['val_loss']) and row['val_loss'] > 0, name
    # math.exp of the same float64 mean, and JSON keeps a float's repr: approx's default rel.
    assert row['val_perplexity'] == pytest.approx(np.exp(row['val_loss'])), name
  assert rows['student_kd']['params'] < rows['teacher']['params']


# ---- Bad input fails before any training, naming the field -----------------------------------

@pytest.mark.parametrize('fields, message', [
    ({'mode': 'bogus'}, r"config\.distill\.mode='bogus'"),
    ({'mode': 'cached', 'hidden_weight': 1.0}, r'config\.distill\.mode=cached'),
    ({'mode': 'cached', 'attention_weight': 1.0}, r'config\.distill\.mode=cached'),
    ({'divergence': 'kl'}, r"config\.distill\.divergence='kl'"),
    ({'alpha': 1.5}, r'config\.distill\.alpha=1\.5'),
    ({'layer_map': '1,7'}, r"config\.distill\.layer_map='1,7'"),
])
def test_bad_distill_config_names_the_field(fields, message):
  with pytest.raises(ValueError, match=message):
    _spec(2, 6, **fields)


def test_few_shot_pair_is_the_run_with_k_shots_a_transfer_set_and_the_same_teacher():
  config = load_config('distill', '')
  pair = few_shot_pair.pair_config(config)
  assert (pair.data.shots_per_class, pair.train.num_steps) == (10, 250)
  assert (pair.distill.mode, pair.distill.transfer, pair.teacher.shots_per_class) == (
      'online', 'rest', 0)
  assert (pair.optim.warmup_steps, pair.train.eval_every, pair.checkpoint.every_steps) == (
      25, 125, 125)
  # Everything else (student, objective, learning rate, seed) is the first pair's.
  for fields in ('student', 'optim.lr', 'distill.alpha', 'distill.temperature', 'seed'):
    got, want = pair, config
    for part in fields.split('.'):
      got, want = got[part], want[part]
    assert got == want, fields
  assert config.data.shots_per_class == 0 and config.distill.mode == 'cached'  # untouched


def test_few_shot_pair_is_off_at_zero_shots_for_a_few_shot_run_and_for_lm():
  config = load_config('distill', 'tiny')
  config.few_shot_pair.shots_per_class = 0
  assert few_shot_pair.pair_config(config) is None
  config = load_config('distill', 'tiny')
  config.data.shots_per_class = 5  # the first pair is already the few-shot one
  assert few_shot_pair.pair_config(config) is None
  assert few_shot_pair.pair_config(load_config('distill', 'tiny,task=lm')) is None


@pytest.mark.parametrize('field, value', [('shots_per_class', -1), ('num_steps', 0)])
def test_bad_few_shot_pair_names_the_field(field, value, tmp_path):
  config = load_config('distill', 'tiny')
  config.few_shot_pair[field] = value
  with pytest.raises(ValueError, match=rf'config\.few_shot_pair\.{field}={value}'):
    distill.run(config, str(tmp_path / 'distill'))
  assert not (tmp_path / 'distill').exists()  # refused before anything was written


def test_student_deeper_than_the_teacher_names_the_field():
  config = load_config('distill', 'tiny')
  config.student.num_layers = TEACHER.num_layers + 1
  card = finished.ModelCard(stage='finetune', model=TEACHER, tokenizer='byte')
  teacher = finished.FinishedModel(workdir='', card=card, config=config, step=0, graphdef=None,
                                   params=None)
  with pytest.raises(ValueError, match=r'config\.student\.num_layers=3; must lie in \[1, 2\]'):
    student_task.student_task(config, '', teacher, None, distilled=True)


def test_teacher_workdir_without_a_finished_run_names_the_field(tmp_path):
  config = load_config('distill', 'tiny')
  config.teacher.workdir = str(tmp_path / 'not_a_run')
  with pytest.raises(ValueError, match=r'config\.teacher\.workdir=.*not_a_run.* no finished run'):
    distill.run(config, str(tmp_path / 'distill'))

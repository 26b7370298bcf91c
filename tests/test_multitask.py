"""Multi-task learning (llmopt_jax/tasks/multitask.py, data/multitask.py, stages/multitask.py):
the realised mixture of training batches, exact resume, independent per-task softmaxes, the
stage end to end with its single-task baselines, and one-line errors for bad inputs.

The tasks are users' files (CSV, JSONL, TSV with their own column names), so that the stage
runs on the 2-layer `tiny_bert` in seconds; the two tasks of the runs have 3 classes each, so
both single-task baselines compile to one program (shared through the persistent cache)."""

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tolerances
from conftest import load_config, restore_state
from llmopt_jax import configlib, hf, losses, sharding
from llmopt_jax.data import mixture
from llmopt_jax.data.multitask import LabelBlocks
from llmopt_jax.stages import multitask as stage
from llmopt_jax.tasks import finished, multitask
from llmopt_jax.train import loop
from llmopt_jax.train.config import TrainConfig

INTENTS = {'alpha': ('refund', 'card', 'transfer'), 'beta': ('weather', 'alarm', 'music'),
           'gamma': ('yes', 'no', 'maybe')}


def _texts(task: str, label: str, count: int, offset: int = 0) -> list[str]:
  return [f'{label} question {task} number {offset + i}' for i in range(count)]


def _write(path, task: str, per_class: int, text: str, label: str, offset: int = 0) -> str:
  rows = [(t, lab) for lab in INTENTS[task] for t in _texts(task, lab, per_class, offset)]
  if path.suffix == '.jsonl':
    path.write_text(''.join(json.dumps({text: t, label: lab}) + '\n' for t, lab in rows))
  else:
    sep = '\t' if path.suffix == '.tsv' else ','
    path.write_text(f'{text}{sep}{label}\n' + ''.join(f'{t}{sep}{lab}\n' for t, lab in rows))
  return str(path)


@pytest.fixture(scope='module')
def files(tmp_path_factory) -> dict[str, dict[str, str]]:
  """Three small tasks of 3 classes, each file kind with its own column names."""
  d = tmp_path_factory.mktemp('tasks')
  alpha = {'text_field': 'query', 'label_field': 'intent'}
  beta = {'text_field': 'body', 'label_field': 'queue'}
  gamma = {'text_field': 'text', 'label_field': 'label'}
  return {
      'alpha': dict(dataset='file', path=_write(d / 'a.csv', 'alpha', 10, 'query', 'intent'),
                    test_path=_write(d / 'a_test.csv', 'alpha', 4, 'query', 'intent', 50),
                    **alpha),
      'beta': dict(dataset='file', path=_write(d / 'b.jsonl', 'beta', 30, 'body', 'queue'),
                   test_path=_write(d / 'b_test.jsonl', 'beta', 4, 'body', 'queue', 50), **beta),
      'gamma': dict(dataset='file', path=_write(d / 'c.tsv', 'gamma', 10, 'text', 'label'),
                    validation_path=_write(d / 'c_val.tsv', 'gamma', 2, 'text', 'label', 40),
                    test_path=_write(d / 'c_test.tsv', 'gamma', 2, 'text', 'label', 50),
                    **gamma)}


def _config(tiny_bert_dir, files, tasks=('alpha', 'beta'), **multi):
  config = load_config('multitask', 'tiny,tasks=' + '+'.join(tasks))
  config.init.model = tiny_bert_dir
  for name in tasks:
    config.tasks[name].update(files[name])
  config.multitask.update(multi)
  # One evaluation and one checkpoint, at the end (of each part of a resumed run).
  config.train.update(batch_size=8, num_steps=4, eval_every=4, eval_batches=1)
  config.checkpoint.every_steps = 4
  # Constant after warmup: the schedule, and so the program, does not depend on num_steps,
  # so a run stopped at step 2 and continued to 4 follows the uninterrupted one exactly.
  config.optim.update(schedule='constant', warmup_steps=1)
  config.test_batches = 0
  return config


# ---- The mixture of training batches ----------------------------------------------------------

@pytest.mark.parametrize('mixing', [
    {'mixing': 'proportional'}, {'mixing': 'temperature', 'temperature': 2.0},
    {'mixing': 'explicit', 'rates': ('alpha:1', 'beta:1', 'gamma:2')}], ids=lambda m: m['mixing'])
def test_realised_task_proportions_follow_the_mixture_at_every_prefix(tiny_bert_dir, files,
                                                                      mixing):
  """The batches the run trains on come task by task in TaskMixture's order, so every prefix
  holds each task within one batch of its rate; each batch is one task's, its labels in the
  task's block."""
  config = _config(tiny_bert_dir, files, ('alpha', 'beta', 'gamma'), **mixing)
  plan = multitask.plan(config)
  sizes = {t.name: len(t.splits['train']) for t in plan.tasks}
  expected = mixture.mixture_rates(sizes, mixing['mixing'], temperature=2.0,
                                   explicit={'alpha': 1, 'beta': 1, 'gamma': 2})
  assert plan.rates == pytest.approx(expected)
  built = plan.build(config)
  schedule = mixture.TaskMixture(plan.rates)
  counts = dict.fromkeys(sizes, 0)
  for n in range(1, 301):
    batch = next(built.task.train_data)
    name = built.blocks.names[batch['task'][0]]
    assert name == schedule.next() and (batch['task'] == batch['task'][0]).all()
    start, end = built.blocks.span(name)
    assert ((batch['labels'] >= start) & (batch['labels'] < end)).all()
    counts[name] += 1
    for task, rate in plan.rates.items():
      assert abs(counts[task] - rate * n) < 1, (n, task, counts)
  assert built.task.train_data.get_state()['mixture'] == counts


def test_mixed_batches_resume_bit_identical_from_their_saved_state(tiny_bert_dir, files):
  """A pipeline rebuilt from the JSON of another's state continues with its very batches."""
  config = _config(tiny_bert_dir, files, ('alpha', 'beta', 'gamma'))
  plan = multitask.plan(config)
  whole = plan.build(config).task.train_data
  expected = [next(whole) for _ in range(40)]
  first = plan.build(config).task.train_data
  head = [next(first) for _ in range(17)]
  resumed = plan.build(config).task.train_data
  resumed.set_state(json.loads(json.dumps(first.get_state())))
  for got, want in zip(head + [next(resumed) for _ in range(23)], expected, strict=True):
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# ---- Heads as blocks --------------------------------------------------------------------------

def test_masked_blocks_give_each_task_its_own_softmax():
  """A row's loss and gradient ignore the other tasks' columns entirely, and equal the
  single-task loss (label smoothing included) on its own block's logits."""
  blocks = LabelBlocks(('a', 'b', 'c'), (3, 5, 2))
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(6, 10)) * 3, jnp.float32)
  task = jnp.array([0, 1, 2, 1, 0, 2])
  local = jnp.array([2, 4, 1, 0, 0, 1])
  labels = local + jnp.asarray(blocks.starts)[task]

  def row_losses(x):
    masked, inside = multitask.masked_logits(x, task, blocks)
    return multitask.block_losses(masked, labels, inside, label_smoothing=0.1)

  row_losses = jax.jit(row_losses)
  base = row_losses(logits)
  grads = jax.jit(jax.jacrev(row_losses))(logits)  # [row, row, column]
  assert np.isfinite(np.asarray(base)).all() and np.isfinite(np.asarray(grads)).all()
  noise = jnp.asarray(rng.normal(size=logits.shape) * 50, jnp.float32)
  for row in range(6):
    start, end = blocks.span(blocks.names[task[row]])
    outside = np.ones(10, bool)
    outside[start:end] = False
    moved = jnp.where(outside, logits + noise, logits)
    assert row_losses(moved)[row] == base[row]  # bit for bit
    assert not np.asarray(grads[row, row, outside]).any()
    alone, weight = losses.classification_loss(logits[row:row + 1, start:end],
                                               local[row:row + 1], jnp.ones(1), 0.1)
    # The same terms (the -inf columns add exact zeros), summed in another order.
    magnitude = float(jnp.abs(logits[row]).sum() + base[row])
    assert abs(float(alone / weight) - float(base[row])) <= tolerances.sum_tolerance(
        10, magnitude)


def test_label_blocks_round_trip_through_the_card_labels():
  blocks = LabelBlocks(('banking77', 'mine'), (3, 2))
  names = blocks.label_names([('a', 'b', 'c/d'), ('x', 'y')])
  assert names == ('banking77/a', 'banking77/b', 'banking77/c/d', 'mine/x', 'mine/y')
  assert LabelBlocks.from_label_names(names) == blocks
  assert blocks.span('mine') == (3, 5) and blocks.total == 5
  with pytest.raises(ValueError, match='not contiguous'):
    LabelBlocks.from_label_names(('a/x', 'b/y', 'a/z'))


# ---- The stage end to end, and resumed --------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _StageRun:
  config: object
  workdir: object
  record: dict


@pytest.fixture(scope='module')
def stage_run(tiny_bert_dir, files, tmp_path_factory) -> _StageRun:
  """The stage, uninterrupted, with its single-task baselines (which run the program the
  mixture compiled); shared by the report test and the resume test."""
  config = _config(tiny_bert_dir, files)
  workdir = tmp_path_factory.mktemp('multitask')
  return _StageRun(config, workdir, stage.run(config, str(workdir)))


def test_stage_reports_each_task_against_its_single_task_run(stage_run, tiny_bert_dir):
  """Multi-task run plus one single-task run per task, same budget; report.json has a row per
  task with both scores; each run's card loads, and the multi-task card's labels give the
  blocks back; the reported test accuracy is the model's own, argmax within the block."""
  workdir = stage_run.workdir
  report = json.loads((workdir / 'report.json').read_text())
  assert [row['task'] for row in report['rows']] == ['alpha', 'beta']
  for row in report['rows']:
    assert row['test_examples'] == 12
    for metric in ('accuracy', 'macro_f1'):
      assert row[f'{metric}_difference'] == pytest.approx(
          row[f'multi_{metric}'] - row[f'single_{metric}'])
  assert set(report['single']) == {'alpha', 'beta'}
  assert sum(report['mixture']['batches'].values()) == 4
  for name, rate in report['mixture']['rates'].items():
    assert abs(report['mixture']['batches'][name] - 4 * rate) < 1
  for sub in ('single_alpha', 'single_beta'):
    assert json.loads((workdir / sub / 'summary.json').read_text())['final_step'] == 4
  assert '| alpha |' in (workdir / 'report.md').read_text()

  mesh, rules = sharding.from_config(configlib.mesh('data'))
  model = finished.load(str(workdir), mesh, rules)
  blocks = LabelBlocks.from_label_names(model.card.labels)
  assert {n: list(blocks.span(n)) for n in blocks.names} == stage_run.record['blocks']
  single = finished.load(str(workdir / 'single_beta'), mesh, rules)
  assert single.card == dataclasses.replace(model.card, run_config='../config.json')
  _check_test_accuracy(model, blocks, report['multi'], tiny_bert_dir,
                       stage_run.config.data.max_len)


def _check_test_accuracy(model, blocks, scores, tokenizer_dir, max_len) -> None:
  """Each task's reported accuracy is its test examples' argmax within the task's columns of
  the loaded model, up to predictions whose top two logits lie within float32 rounding of
  each other (the sharded eval adds in another order)."""
  forward = jax.jit(lambda params, batch: nnx.merge(model.graphdef, params)(**batch))
  tokenize = hf.load_tokenizer(tokenizer_dir, max_len)
  for name in ('alpha', 'beta'):
    rows = [(t, lab) for lab in INTENTS[name] for t in _texts(name, lab, 4, 50)]
    logits = np.asarray(forward(model.params, tokenize([t for t, _ in rows])))
    start, end = blocks.span(name)
    mine = np.sort(logits[:, start:end], axis=-1)
    near_ties = (mine[:, -1] - mine[:, -2]) <= tolerances.sum_tolerance(
        tolerances.forward_terms(model.card.model, max_len), np.abs(logits).max())
    truth = np.array([sorted(INTENTS[name]).index(lab) for _, lab in rows])
    correct = (logits[:, start:end].argmax(-1) == truth).sum()
    assert abs(scores[name]['accuracy'] * len(rows) - correct) <= near_ties.sum(), name


class _Recorder:
  """A task's training batches, recorded as the loop draws them."""

  def __init__(self, inner):
    self.inner, self.seen = inner, []

  def __next__(self):
    self.seen.append(next(self.inner))
    return self.seen[-1]

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def _train(config, workdir) -> list[dict]:
  """Trains a freshly built multi-task run to config.train.num_steps (resuming from the
  workdir's checkpoint if any), as a new process would; returns the batches it drew."""
  task = multitask.plan(config).build(config).task
  recorder = _Recorder(task.train_data)
  loop.train(TrainConfig.from_config(config), str(workdir),
             dataclasses.replace(task, train_data=recorder))
  return recorder.seen


def test_a_resumed_run_sees_the_same_batches_and_ends_with_the_same_parameters(
    stage_run, tmp_path):
  """Stopped after 2 steps, then continued to 4: the batches it draws are bit for bit those
  an uninterrupted run draws (a fresh pipeline's first 4), and it ends with the parameters of
  the stage's uninterrupted run."""
  config = copy.deepcopy(stage_run.config)
  config.train.num_steps = 2
  seen = _train(config, tmp_path)
  config.train.num_steps = 4
  seen += _train(config, tmp_path)
  fresh = multitask.plan(config).build(config).task.train_data
  whole = [next(fresh) for _ in range(4)]
  assert {int(b['task'][0]) for b in whole} == {0, 1}  # both tasks took part
  for got, want in zip(seen, whole, strict=True):
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  ours, theirs = restore_state(tmp_path, 4), restore_state(stage_run.workdir, 4)
  jax.tree.map(np.testing.assert_array_equal, ours['params'], theirs['params'])


# ---- Bad inputs -------------------------------------------------------------------------------

@pytest.mark.parametrize('change, field', [
    (lambda c: c.tasks.alpha.update(label_field='category'), 'config.tasks.alpha.label_field'),
    (lambda c: c.multitask.update(mixing='uniformly'), 'config.multitask.mixing'),
    (lambda c: c.multitask.update(mixing='explicit', rates=('alpha:1', 'beta:1', 'gamma:1')),
     "config.multitask.rates: 'gamma' is not a task"),
    (lambda c: c.multitask.update(mixing='explicit', rates=('alpha:1',)),
     "config.multitask.rates: no rate for task 'beta'"),
    (lambda c: c.multitask.update(rates=('alpha=1',)), r'config.multitask.rates\[0\]'),
    (lambda c: c.multitask.update(tasks=()), 'config.multitask.tasks is empty'),
    (lambda c: c.multitask.update(tasks=('alpha', 'delta')), 'config.tasks.delta'),
    (lambda c: c.tasks.beta.update(test_path=''), 'config.tasks.beta.test_path'),
    (lambda c: c.tasks.beta.update(dataset='imdb'), 'config.tasks.beta.dataset'),
], ids=['no_label_field', 'unknown_mixing', 'rate_of_no_task', 'task_without_rate',
        'rate_syntax', 'no_tasks', 'undefined_task', 'file_without_test', 'unknown_dataset'])
def test_bad_inputs_fail_in_one_line_naming_the_field(tiny_bert_dir, files, tmp_path, change,
                                                      field):
  config = _config(tiny_bert_dir, files)
  change(config)
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=field) as e:
    stage.run(config, str(workdir))
  assert '\n' not in str(e.value)
  assert not workdir.exists()  # nothing written


def test_tiny_config_defaults():
  """The default tasks are the shipped sets in block order, mixed proportionally, with
  baselines; a name that is not a shipped set is a file task."""
  config = load_config('multitask', 'tiny')
  assert config.stage == 'multitask' and config.multitask.tasks == ('banking77', 'clinc150')
  assert config.multitask.baselines and config.multitask.mixing == 'proportional'
  assert load_config('multitask', 'tasks=clinc150+mine').tasks.mine.dataset == 'file'
  assert config.init.model == 'minilm'

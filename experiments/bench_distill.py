"""Distillation step benchmark: is the KD step just the student's step plus a teacher forward?

  python experiments/bench_distill.py --config=configs/distill.py
  python experiments/bench_distill.py --config=configs/distill.py \
      --config.distill.hidden_weight=1 --config.distill.attention_weight=1
  python experiments/bench_distill.py --config=configs/distill.py --config.teacher.dtype=bfloat16

Times, on the same batches and in the same run: (a) the online distillation train step,
(b) the student's own train step on labels, (c) the teacher's forward pass. The teacher is the
pretrained model of the config (`config.init.model`, MiniLM by default) with a fresh head;
weights do not change the timing. Target: (a) <= 1.1 x ((b) + (c)), i.e. distillation adds
nothing but the teacher's forward pass.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the path fix above)
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from llmopt_jax import cli, hf, sharding  # noqa: E402
from llmopt_jax.hf.load import build  # noqa: E402
from llmopt_jax.models.heads import HeadConfig  # noqa: E402
from llmopt_jax.distill import student_task  # noqa: E402
from llmopt_jax.tasks import classification, finished, problem as problem_lib  # noqa: E402
from llmopt_jax.train.config import TrainConfig  # noqa: E402
from llmopt_jax.train import setup as setup_lib  # noqa: E402
from llmopt_jax.train import state as state_lib  # noqa: E402
from llmopt_jax.train import step as step_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A distill config, e.g. configs/distill.py.', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps.', lower_bound=1)
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps first.', lower_bound=1)
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds of timing, taken in turns.', lower_bound=1)
flags.mark_flags_as_required(['config'])


def _teacher(config, mesh, rules, head: HeadConfig,
             labels: tuple[str, ...]) -> finished.FinishedModel:
  """The pretrained model with a fresh head, standing in for a fine-tuned teacher."""
  model, model_config = hf.load_pretrained(
      hf.minilm_path() if config.init.model == 'minilm' else config.init.model,
      mesh=mesh, rules=rules, head=head, dropout_rate=0.0)
  dtype = config.teacher.dtype
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(
      model_config.replace(dtype=dtype, param_dtype=dtype), head, nnx.Rngs(0))))
  params = jax.tree.map(lambda x: x.astype(dtype), nnx.state(model, nnx.Param))
  card = finished.ModelCard(stage='finetune', model=model_config, tokenizer='huggingface',
                            head=head, labels=labels)
  return finished.FinishedModel('', card, config, 0, graphdef, params)


def _time_steps(step, state, batches, *, constants, warmup: int) -> float:
  """Seconds per train step over `batches[warmup:]`. The state is donated, so each call steps
  a copy of it: every round starts from the same state."""
  state = jax.tree.map(jnp.copy, state)
  for batch in batches[:warmup]:
    state, metrics = step(state, batch, constants)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for batch in batches[warmup:]:
    state, metrics = step(state, batch, constants)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - start) / (len(batches) - warmup)


def _time_forward(forward, params, batches, *, warmup: int) -> float:
  for batch in batches[:warmup]:
    out = forward(params, batch)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for batch in batches[warmup:]:
    out = forward(params, batch)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / (len(batches) - warmup)


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  if config.get('task') != 'classification':
    raise ValueError('bench_distill times the classification distillation (configs/distill.py)')
  with config.unlocked():
    config.distill.mode = 'online'  # the step under test runs the teacher inside it
  mesh, rules = sharding.from_config(config.mesh)
  built = classification.fine_tuning(config, None)
  teacher = _teacher(config, mesh, rules, built.head, tuple(built.splits.label_names))
  problem = problem_lib.make(config, teacher)
  data = problem.task.train_data
  batches = [sharding.shard_batch(next(data), mesh, rules)
             for _ in range(_WARMUP.value + _STEPS.value)]

  # Each candidate is built once, then all three are timed in turns, `--rounds` times, and the
  # median round is kept: on a shared machine, load that comes and goes hits all three alike.
  candidates = {}
  for name, distilled in (('distill step', True), ('student step', False)):
    task = student_task.student_task(config, '', teacher, problem, distilled)
    setup = setup_lib.Setup.of(TrainConfig.from_config(config), task)
    train_step = step_lib.make_train_step(setup.graphdef, setup.tx, task.loss_fn, seed=0)
    constants = teacher.params if distilled else None
    jitted, _ = step_lib.jit_steps(
        train_step, step_lib.make_eval_step(setup.graphdef, task.eval_fn), setup.shardings,
        mesh, rules, constants_shardings=jax.tree.map(lambda x: x.sharding, constants))
    state = state_lib.initialize(setup.init, setup.shardings)
    candidates[name] = functools.partial(_time_steps, jitted, state, constants=constants)
  needs_inner = bool(config.distill.hidden_weight or config.distill.attention_weight)
  forward = jax.jit(lambda params, batch: problem.io.forward(
      nnx.merge(teacher.graphdef, params), batch, None, needs_inner))
  candidates['teacher forward'] = functools.partial(_time_forward, forward, teacher.params)

  samples = {name: [] for name in candidates}
  for _ in range(_ROUNDS.value):
    for name, timed in candidates.items():
      samples[name].append(timed(batches, warmup=_WARMUP.value))
  seconds = {name: statistics.median(s) for name, s in samples.items()}

  reference = seconds['student step'] + seconds['teacher forward']
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind}; batch '
        f'{config.train.batch_size} x {config.data.max_len} tokens; teacher '
        f'{teacher.card.model.num_layers} layers ({config.teacher.dtype}), student '
        f'{config.student.num_layers}; median of {_ROUNDS.value} rounds of {_STEPS.value} steps')
  for name, s in seconds.items():
    print(f'{name:<16} {1e3 * s:8.1f} ms')
  print(f'{"student + teacher":<16} {1e3 * reference:8.1f} ms')
  print(f'ratio distill / (student + teacher forward) = {seconds["distill step"] / reference:.3f}'
        f' (target <= 1.1)')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

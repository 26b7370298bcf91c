"""The training loop shared by every stage: one trainer, read top to bottom.

A stage (pretrain, fine-tune, distill, ...) builds a `Task` (`train/task.py`: how to make the
model, its loss, its eval metrics, its data) and calls `train` with its `TrainConfig`. The
loop owns the rest: mesh, sharded state, jitted steps, evaluation, early stopping, the NaN/Inf
guard, checkpoints and exact resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from llmopt_jax import metrics as metrics_lib
from llmopt_jax import distributed, optim, sharding
from llmopt_jax.train import interrupt, memory, reporting
from llmopt_jax.train import setup as setup_lib
from llmopt_jax.train import state as state_lib
from llmopt_jax.train import step as step_lib
from llmopt_jax.train import window as window_lib
from llmopt_jax.train.checkpoint import Checkpoints
from llmopt_jax.train.config import TrainConfig
from llmopt_jax.train.early_stopping import EarlyStopping
from llmopt_jax.train.logger import Logger
from llmopt_jax.train.task import Task
from llmopt_jax.train.window import NonFiniteError  # noqa: F401  (raised by the loop)


def train(config: TrainConfig, workdir: str, task: Task) -> dict[str, Any]:
  """Trains (or resumes) to `config.num_steps`; returns the run summary."""
  # ---- Mesh, model, optimizer, and where the state lives ------------------------------------
  setup = setup_lib.Setup.of(config, task)
  sharding.check_batch(config.batch_size, setup.mesh, setup.rules, config.num_micro_batches)

  # ---- Checkpoints: resume if the workdir has one -------------------------------------------
  checkpoints = setup_lib.open_checkpoints(config, workdir)
  state, start, stopper, problems = _initial_state(config, setup, task, checkpoints)
  log = Logger(workdir, total_steps=config.num_steps, start_step=start)
  for problem in problems:
    log.info(problem)
  if start:
    log.info(f'Resumed from {checkpoints.directory}/{start}.')
  if start >= config.num_steps or stopper.should_stop:
    log.info(f'Nothing to do: the run in {workdir} already finished at step {start}.')
    for stale in checkpoints.apply_retention():
      log.info(f'Deleted {checkpoints.directory}/{stale}, which the run that saved it was '
               f'killed before deleting (it is not among the checkpoints to keep).')
    return _finish(workdir, checkpoints, log, stopper, start,
                   last_eval=_logged_eval(log.path, start))

  # ---- Steps and loop -----------------------------------------------------------------------
  steps = Steps.of(config, setup, task)
  try:
    with interrupt.CtrlC() as ctrl_c:
      window = window_lib.Window(checkpoints, start, ctrl_c)
      step, stopper, eval_metrics, last_loss = _loop(
          config, setup, task, steps, state, stopper, window, log)
    checkpoints.wait()
  except reporting.StopRun as stop:  # a sweep's pruner: unfinished, so no summary.json
    checkpoints.close()
    log.info(f'Stopped at step {window.last_step}: {stop}; rerun the same command to resume.')
    log.close()
    raise
  except interrupt.Stop:
    _wait_quietly(checkpoints)  # a save in flight completes
    log.abandon()
    raise interrupt.Interrupted(
        f'interrupted at step {window.last_step}; the last checkpoint is step '
        f'{checkpoints.latest_step()} in {checkpoints.directory}; rerun the same command to '
        f'resume') from None
  except BaseException:
    _wait_quietly(checkpoints)
    log.abandon()
    raise
  if jax.process_count() > 1:  # lets a launcher check that the processes agree
    print(f'process {jax.process_index()}/{jax.process_count()}: step {step}, '
          f'train loss {last_loss:.8f}', flush=True)
  return _finish(workdir, checkpoints, log, stopper, step, eval_metrics)


def _initial_state(config: TrainConfig, setup: setup_lib.Setup, task: Task,
                   checkpoints: Checkpoints
                   ) -> tuple[state_lib.TrainState, int, EarlyStopping, list[str]]:
  """(state, step, early stopping record, problems): the newest checkpoint that verifies,
  with the data position restored, or a fresh state born sharded (from the task's pretrained
  weights if any); `problems` name the damaged checkpoints passed over."""
  stopper = EarlyStopping(**dataclasses.asdict(config.early_stopping))
  start, state, progress, problems = checkpoints.restore_newest_good(setup.abstract)
  if problems and start is None:
    raise FileNotFoundError(f'no checkpoint in {checkpoints.directory} can be used ('
                            + '; '.join(problems) + '); rerun to start the run afresh')
  if start is not None:
    task.train_data.set_state(_this_process(progress['data'], checkpoints.directory))
    return state, start, stopper.with_json(progress['early_stopping']), problems
  if task.pretrained is None:
    return state_lib.initialize(setup.init, setup.shardings), 0, stopper, problems
  state = state_lib.initialize_from(task.pretrained(setup.mesh, setup.rules), setup.tx,
                                    setup.shardings, task.extend_params)
  return state, 0, stopper, problems


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted train and eval steps, and the constants the loss reads (placed once); the
  benchmarks time this very train step (`train/benchmark.py`)."""
  train: Any
  eval: Any
  constants: Any

  @classmethod
  def of(cls, config: TrainConfig, setup: setup_lib.Setup, task: Task) -> Steps:
    train_step = step_lib.make_train_step(
        setup.graphdef, setup.tx, task.loss_fn, seed=config.seed,
        num_micro_batches=config.num_micro_batches, params_transform=task.params_transform)
    eval_step = step_lib.make_eval_step(
        setup.graphdef, task.eval_fn, params_transform=task.params_transform)
    constants = None if task.constants is None else task.constants(setup.mesh, setup.rules)
    train_step, eval_step = step_lib.jit_steps(
        train_step, eval_step, setup.shardings, setup.mesh, setup.rules,
        constants_shardings=jax.tree.map(lambda a: a.sharding, constants))
    return cls(train_step, eval_step, constants)

  def evaluate(self, params, task: Task, setup: setup_lib.Setup) -> dict[str, float]:
    sums = metrics_lib.total(
        self.eval(params, sharding.shard_batch(b, setup.mesh, setup.rules))
        for b in task.eval_data())
    return metrics_lib.prefixed(metrics_lib.finalize(sums), 'eval')


def _loop(config: TrainConfig, setup: setup_lib.Setup, task: Task, steps: Steps, state,
          stopper: EarlyStopping, window: window_lib.Window, log: Logger):
  """Steps after `window.last_step` up to `num_steps`: log, evaluate, checkpoint, stop early.
  Returns (last step, early stopping record, last eval metrics, last logged train loss)."""
  timer = window_lib.Throughput()
  schedule = optim.make_schedule(config.optim, config.num_steps)
  compiled = None  # compiled ahead of time at the first batch, for the memory report
  eval_metrics, last_loss = None, float('nan')
  for step in range(window.last_step + 1, config.num_steps + 1):
    batch = sharding.shard_batch(next(task.train_data), setup.mesh, setup.rules)
    if compiled is None:
      compiled = steps.train.lower(state, batch, steps.constants).compile()
      log.info(f'Mesh {dict(setup.mesh.shape)}, memory per device:\n'
               + memory.report(setup.abstract, compiled))
    state, step_metrics = compiled(state, batch, steps.constants)
    # Keep at most one step queued behind the running one: the device never idles, and host
    # memory for queued batches stays bounded (deep queues of collectives have also been seen
    # to hang XLA's CPU runtime on simulated multi-device meshes).
    window.wait_for_previous()
    window.add(step, step_metrics)
    timer.count(task.count_tokens(batch))

    last = step == config.num_steps
    if step % config.log_every == 0 or last:
      means, throughput = window.flush(), timer.rate()
      log.write(step, {**metrics_lib.prefixed(means, 'train'),
                       'train/lr': float(schedule(step - 1)), 'train/tokens_per_s': throughput})
      log.progress(step, loss=means['loss'], tok_s=throughput)
      last_loss = means['loss']
    else:
      log.progress(step)

    eval_metrics = None
    if step % config.eval_every == 0 or last:
      window.check_finite()
      eval_metrics = steps.evaluate(state.params, task, setup)
      stopper = stopper.update(step, eval_metrics)
      log.write(step, eval_metrics)
      log.info(f'step {step}: ' + ', '.join(f'{k}={v:.4f}' for k, v in eval_metrics.items()))
    if eval_metrics or last or step % config.checkpoint.every_steps == 0:
      window.check_finite()
      _save(window.checkpoints, step, state, task, stopper, eval_metrics)
    if eval_metrics:  # after the save, so a run stopped here resumes from this step
      reporting.report(step, eval_metrics)
    if stopper.should_stop:
      log.info(f'Early stopping at step {step}: {stopper.metric} has not improved for '
               f'{stopper.patience} evaluations; best {stopper.best_value:.4f} at step '
               f'{stopper.best_step}.')
      break
  return step, stopper, eval_metrics, last_loss


def _wait_quietly(checkpoints: Checkpoints) -> None:
  """Lets saves in flight complete when the run is failing: their own error, if any, is not
  the one to report."""
  try:
    checkpoints.wait()
  except Exception:  # noqa: BLE001
    pass


def _save(checkpoints: Checkpoints, step: int, state, task: Task, stopper: EarlyStopping,
          eval_metrics: dict[str, float] | None) -> None:
  """Checkpoint `step` with every process's data position (one list entry per process) and
  the early stopping record; all processes call this."""
  progress = {'data': distributed.allgather_json(task.train_data.get_state()),
              'early_stopping': stopper.to_json()}
  checkpoints.save(step, state, progress, metrics=eval_metrics)


def _this_process(states: list[dict], directory: str) -> dict:
  """This process's entry of the data positions saved by every process."""
  if len(states) != jax.process_count():
    raise ValueError(f'the checkpoints in {directory} were written by {len(states)} '
                     f'processes; resume with the same number (now {jax.process_count()})')
  return states[jax.process_index()]


def _finish(workdir: str, checkpoints: Checkpoints, log: Logger, stopper: EarlyStopping,
            step: int, last_eval: dict[str, float] | None) -> dict[str, Any]:
  """Writes summary.json and prints where the results are."""
  checkpoints.close()
  summary_path = os.path.join(workdir, 'summary.json')
  summary = _read_json(summary_path) if last_eval is None else {}
  summary.update({
      'final_step': step,
      'early_stopped': stopper.should_stop,
      'best_step': stopper.best_step,
      f'best_{stopper.metric}': None if np.isnan(stopper.best_value) else stopper.best_value,
      'best_checkpoint': os.path.join(checkpoints.directory, str(stopper.best_step)),
      'checkpoint_steps': checkpoints.all_steps(),
  })
  if last_eval is not None:
    summary['final_eval'] = last_eval
  if jax.process_index() == 0:
    tmp = summary_path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=2)
    os.replace(tmp, summary_path)
  log.info(f'Best {stopper.metric} = {stopper.best_value:.4f} at step {stopper.best_step} '
           f'({summary["best_checkpoint"]}).')
  log.info(f'Results in {os.path.abspath(workdir)}: summary.json, metrics.jsonl, '
           f'checkpoints/, tensorboard/')
  log.close()
  return summary


def _logged_eval(metrics_path: str, step: int) -> dict[str, float] | None:
  """The eval metrics that metrics.jsonl holds for `step`, or None: a finished run's last
  evaluation, for a rerun that finds the run done but its summary missing (killed between
  the last checkpoint and summary.json)."""
  if not os.path.exists(metrics_path):
    return None
  found = None
  with open(metrics_path, encoding='utf-8') as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if record.get('step') == step and any(k.startswith('eval/') for k in record):
        found = {k: v for k, v in record.items() if k.startswith('eval/')}
  return found


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding='utf-8') as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise ValueError(f'{path}: not valid JSON ({e}); delete it and rerun the same command '
                       f'to rebuild it') from None

"""A task's train step, built as the training loop builds it, for the benchmarks to time.

A benchmark that assembles its own step times something else: another optimizer (the loop
freezes parameters and wraps the optimizer per task), other placements, no donation, no
teacher constants. So `experiments/bench_train.py` and `experiments/bench_vs_torch.py` take
the step from here, made of the pieces `loop.train` puts together: `Setup.of` (mesh,
optimizer, born-sharded state), the task's pretrained weights and constants,
`step.make_train_step` and `step.jit_steps` (state donated), compiled ahead of time like the
loop's first step, so compilation is never in a timed window and the executable timed is the
one whose memory a benchmark reports.

Batches are placed on the devices before any clock starts: the figures are the step's, not
the input pipeline's (whose own rate `device_batches` measures).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from llmopt_jax import sharding
from llmopt_jax.train import loop
from llmopt_jax.train import setup as setup_lib
from llmopt_jax.train import state as state_lib
from llmopt_jax.train.config import TrainConfig
from llmopt_jax.train.task import ResumableIterator, Task


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """The compiled `(state, batch, constants) -> (state, metric sums)` and what it runs on."""
  setup: setup_lib.Setup
  step: Any       # a jax `Compiled`; it donates the state it is given
  constants: Any  # the task's constants on the mesh (a teacher's parameters), or None

  def place(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """A host batch on the step's devices, split over the mesh as the loop splits it."""
    return sharding.shard_batch(batch, self.setup.mesh, self.setup.rules)


def compile_train_step(train: TrainConfig, task: Task, batch: Mapping[str, np.ndarray]
                       ) -> tuple[CompiledStep, state_lib.TrainState]:
  """The loop's train step for `task`, compiled for batches shaped like `batch`, and the
  state it starts from (the task's pretrained weights, else a fresh one)."""
  setup = setup_lib.Setup.of(train, task)
  sharding.check_batch(train.batch_size, setup.mesh, setup.rules, train.num_micro_batches)
  state = _first_state(setup, task)
  steps = loop.Steps.of(train, setup, task)
  placed = sharding.shard_batch(batch, setup.mesh, setup.rules)
  compiled = steps.train.lower(state, placed, steps.constants).compile()
  return CompiledStep(setup, compiled, steps.constants), state


def _first_state(setup: setup_lib.Setup, task: Task) -> state_lib.TrainState:
  """The state a run starts from with no checkpoint, as `loop.train` makes it."""
  if task.pretrained is None:
    return state_lib.initialize(setup.init, setup.shardings)
  return state_lib.initialize_from(task.pretrained(setup.mesh, setup.rules), setup.tx,
                                   setup.shardings, task.extend_params)


def device_batches(data: ResumableIterator, count: int, step: CompiledStep
                   ) -> tuple[list[dict[str, jax.Array]], float]:
  """`count` batches of `data` placed on the devices, and how many per second the input
  pipeline made (reading and placing them)."""
  start = time.perf_counter()
  batches = [step.place(next(data)) for _ in range(count)]
  jax.block_until_ready(batches)
  return batches, count / (time.perf_counter() - start)


def run(step: CompiledStep, state: state_lib.TrainState, batches: Sequence[Mapping[str, Any]]
        ) -> state_lib.TrainState:
  """Runs the step over `batches`; returns the last state once the devices are done with it.

  Each step is dispatched before we wait for the one before it, so the devices always have
  the next step queued and never idle on the host. The queue is kept at two steps rather than
  left to grow: with ~100 queued steps, XLA's CPU runtime deadlocks in the all-reduce of
  simulated devices (seen with 8 devices on 2 cores).
  """
  previous = None
  for batch in batches:
    state, metrics = step.step(state, batch, step.constants)  # donated: keep the latest
    jax.block_until_ready(previous)
    previous = metrics
  return jax.block_until_ready(state)


def seconds_per_step(step: CompiledStep, state: state_lib.TrainState,
                     warmup: Sequence[Mapping[str, Any]], timed: Sequence[Mapping[str, Any]]
                     ) -> tuple[float, state_lib.TrainState]:
  """(mean seconds per step over `timed`, after untimed steps on `warmup`; the last state)."""
  if not timed:
    raise ValueError('seconds_per_step needs at least one timed batch')
  state = run(step, state, warmup)
  start = time.perf_counter()
  state = run(step, state, timed)
  return (time.perf_counter() - start) / len(timed), state

"""The seam between a stage and the training loop: a `Task` says what is trained on what.

A stage (or a library task builder under `llmopt_jax/tasks/`) builds a `Task`: how to make the
model, its loss, its eval metrics, its data, and the optional hooks of a technique (starting
weights, LoRA's trainable tree, a teacher's constants). `loop.train` owns everything else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from llmopt_jax import sharding
from llmopt_jax.train import step as step_lib


class ResumableIterator(Protocol):
  """Training batches (this process's share, numpy) with a JSON-able position."""

  def __next__(self) -> dict[str, np.ndarray]: ...
  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...


@dataclasses.dataclass(frozen=True)
class Task:
  """Everything stage-specific that the loop needs."""
  build_model: Callable[[nnx.Rngs], nnx.Module]
  loss_fn: step_lib.LossFn
  eval_fn: step_lib.EvalFn
  train_data: ResumableIterator
  eval_data: Callable[[], Iterable[dict[str, np.ndarray]]]
  # Input tokens in a (global) batch, for the tokens/s figure.
  count_tokens: Callable[[dict[str, jax.Array]], int] = lambda batch: batch['inputs'].size
  # Starting weights, e.g. a Hugging Face checkpoint placed on (mesh, rules); None = random.
  pretrained: Callable[[Mesh, sharding.Rules], nnx.State] | None = None
  # Techniques whose trainable tree differs from the model's parameters (LoRA): model params
  # -> trainable tree at init, trainable tree -> model params in every step, and which
  # trainable paths are frozen (no update, no optimizer state).
  extend_params: Callable[[nnx.State], Any] | None = None
  params_transform: step_lib.ParamsTransform | None = None
  frozen: Callable[[str], bool] | None = None
  # Techniques that change the update rule itself (pruning keeps masked weights at zero and
  # updates the masks on a schedule): the run's optimizer -> the one the step applies.
  wrap_optimizer: Callable[[optax.GradientTransformation], optax.GradientTransformation] | None = (
      None)
  # Arrays the loss reads but never trains, e.g. a distillation teacher's parameters, placed
  # on (mesh, rules); the loss gets them as `context.constants`. Never checkpointed.
  constants: Callable[[Mesh, sharding.Rules], Any] | None = None

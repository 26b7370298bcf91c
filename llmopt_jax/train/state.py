"""The train state, and how it is born sharded.

The state is a plain pytree: the step, the model's parameters (an NNX `State`) and the Optax
state. The model's structure (its `GraphDef`) and the optimizer's update rule are static and
live outside it, in the step's closure. Nothing else is needed to resume exactly: the dropout
key is folded from the step and the data position is saved beside the state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from llmopt_jax import sharding


class TrainState(struct.PyTreeNode):
  step: jax.Array            # int32 scalar: number of optimizer updates applied so far
  params: nnx.State          # nnx.Param variables, each annotated with its logical axes
  opt_state: optax.OptState  # its moment estimates carry the same annotations


def init_fn(
    build_model: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation, seed: int,
    extend_params: Callable[[nnx.State], Any] | None = None,
) -> tuple[nnx.GraphDef, Callable[[], TrainState]]:
  """The model's graphdef and a function creating a fresh state (meant to run under jit).

  `extend_params` turns the model's parameters into the trainable tree when the two differ
  (LoRA adds adapters beside the frozen weights); it runs inside `init`, so what it adds is
  born sharded too.
  """
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(nnx.Rngs(params=seed))))

  def init() -> TrainState:
    params = nnx.state(build_model(nnx.Rngs(params=seed)), nnx.Param)
    if extend_params is not None:
      params = extend_params(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return graphdef, init


def abstract_and_shardings(
    init: Callable[[], TrainState], mesh: Mesh, rules: sharding.Rules
) -> tuple[TrainState, Any]:
  """The state's shapes (with shardings attached) and its shardings, allocating nothing.

  `eval_shape` gives the shapes and the logical axes of every array; the shardings follow from
  them through the rules table.
  """
  abstract = jax.eval_shape(init)
  shardings = sharding.tree_shardings(abstract, mesh, rules)
  with_shardings = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return with_shardings, shardings


def initialize(init: Callable[[], TrainState], shardings: Any) -> TrainState:
  """Runs `init` under jit so every array is written straight into its shards: no host ever
  holds a full copy of a parameter it does not own."""
  return jax.jit(init, out_shardings=shardings)()


def initialize_from(
    params: nnx.State, tx: optax.GradientTransformation, shardings: Any,
    extend_params: Callable[[nnx.State], Any] | None = None,
) -> TrainState:
  """A fresh state around given model parameters (pretrained weights, already on the mesh):
  only the extension (LoRA adapters) and the optimizer state are created, born sharded."""
  def init(params: nnx.State) -> TrainState:
    if extend_params is not None:
      params = extend_params(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return jax.jit(init, out_shardings=shardings)(params)

"""The train and eval steps: pure functions of (state, batch), jitted once with shardings.

A technique (distillation, QAT, LoRA, pruning) changes the loss function or the update rule it
hands to `make_train_step`; it never writes a second step. A loss function has the signature

    loss_fn(model, batch, rngs, context) -> (objective_sum, weight, metric_sums)

and the step minimises objective_sum / weight over the whole (possibly accumulated) batch.
`context` carries what a loss may need besides the batch: the step (for schedules, e.g. a
distillation temperature) and the task's constants, arrays the loss reads but never trains
(a distillation teacher's parameters). Constants are an argument of the jitted step, placed on
the mesh once; they are not in the train state, so they get no gradient, no optimizer state
and no place in checkpoints.

A technique whose trainable state is not the model's own parameters (LoRA keeps frozen base
weights and adapters) passes a `params_transform(params, rng) -> model params`, applied inside
the differentiated objective just before `nnx.merge`; `rng` is None in evaluation. The default
is the identity, and the step knows nothing else about the technique.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmopt_jax import optim, sharding
from llmopt_jax.metrics import MetricSums
from llmopt_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]


class LossContext(NamedTuple):
  step: jax.Array  # int32 scalar: optimizer updates applied before this one
  constants: Any   # the task's constants (e.g. teacher parameters) on the mesh, or None


LossFn = Callable[[nnx.Module, Batch, nnx.Rngs | None, LossContext],
                  tuple[jax.Array, jax.Array, MetricSums]]
EvalFn = Callable[[nnx.Module, Batch], MetricSums]
# (trainable params, key or None) -> the model's params
ParamsTransform = Callable[[Any, jax.Array | None], nnx.State]

# Dropout keys are drawn from this stream of the run's seed, folded with the step.
_DROPOUT_STREAM = 1
# The params transform's key is this stream of the (step's or micro-batch's) dropout key, so
# the model's own dropout keys stay what they were without a transform.
_TRANSFORM_STREAM = 1


def _no_transform(params: Any, rng: jax.Array | None) -> Any:
  del rng
  return params


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    *,
    seed: int,
    num_micro_batches: int = 1,
    params_transform: ParamsTransform | None = None,
) -> Callable[..., tuple[TrainState, MetricSums]]:
  """Builds `train_step(state, batch, constants=None) -> (state, metrics)`; metrics are
  (sum, count) pairs."""
  base_key = jax.random.fold_in(jax.random.key(seed), _DROPOUT_STREAM)
  transform = params_transform or _no_transform

  def train_step(state: TrainState, batch: Batch, constants: Any = None
                 ) -> tuple[TrainState, MetricSums]:
    context = LossContext(state.step, constants)

    def loss_and_grad(params, batch, rng):
      def objective(params):
        model_params = transform(params, jax.random.fold_in(rng, _TRANSFORM_STREAM))
        model = nnx.merge(graphdef, model_params)
        loss_sum, weight, sums = loss_fn(model, batch, nnx.Rngs(dropout=rng), context)
        return loss_sum, (weight, sums)
      return jax.value_and_grad(objective, has_aux=True)(params)

    rng = jax.random.fold_in(base_key, state.step)
    grad_sum, weight, sums = optim.accumulate_gradients(
        loss_and_grad, state.params, batch, rng, num_micro_batches)
    grads = jax.tree.map(lambda g: g / weight, grad_sum)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    loss_sum = sums['loss'][0] if 'loss' in sums else jnp.zeros(())
    # One flag for the NaN/Inf guard: a non-finite gradient shows up in its global norm.
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss_sum)
    metrics = {
        **sums,
        'grad_norm': (grad_norm, jnp.ones(())),
        'finite': (finite.astype(jnp.float32), jnp.ones(())),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, eval_fn: EvalFn, *,
                   params_transform: ParamsTransform | None = None
                   ) -> Callable[[Any, Batch], MetricSums]:
  """Builds `eval_step(params, batch) -> metric sums` with the model in deterministic mode."""
  transform = params_transform or _no_transform

  def eval_step(params: nnx.State, batch: Batch) -> MetricSums:
    return eval_fn(nnx.merge(graphdef, transform(params, None)), batch)
  return eval_step


def _traced_under_rules(fn, mesh: Mesh, rules: sharding.Rules):
  """`fn`, traced with `sharding.constrain` placing activations on `mesh` by `rules`."""
  def wrapped(*args):
    with sharding.use(mesh, rules):
      return fn(*args)
  return wrapped


def jit_eval_step(eval_step, params_shardings: Any, mesh: Mesh, rules: sharding.Rules):
  """The eval step jitted with explicit shardings; metric sums come back replicated."""
  return jax.jit(
      _traced_under_rules(eval_step, mesh, rules),
      in_shardings=(params_shardings, sharding.batch_sharding(mesh, rules)),
      out_shardings=NamedSharding(mesh, PartitionSpec()),
  )


def jit_steps(train_step, eval_step, state_shardings: Any, mesh: Mesh, rules: sharding.Rules,
              constants_shardings: Any = None):
  """Jits both steps with explicit in/out shardings (pjit semantics); the state is donated.

  The jitted train step takes `(state, batch, constants)`; constants keep their placement.
  """
  jitted_train = jax.jit(
      _traced_under_rules(train_step, mesh, rules),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh, rules), constants_shardings),
      out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),
      donate_argnums=(0,),
  )
  return jitted_train, jit_eval_step(eval_step, state_shardings.params, mesh, rules)

"""The optimizer: one Optax chain built from `config.optim`.

    partition(train: clip_by_global_norm -> AdamW(schedule, weight-decay mask),
              frozen: set_to_zero)  ->  layer-wise learning-rate decay

AdamW is Loshchilov & Hutter (2019). Weight decay is applied only to matrices: decaying RMSNorm
scales and biases pulls them towards zero for no regularisation benefit, and whether the token
embedding is decayed is a research choice (`decay_embeddings`).

Freezing (`config.optim.freeze`, regex patterns on '/'-joined parameter paths such as
`blocks/0/attn/q`, matched in full): frozen parameters go to an `optax.set_to_zero` branch of
`optax.multi_transform`, so they get no update, no clipping share and, because the AdamW branch
only sees the trainable leaves, no moment estimates: fine-tuning half a model pays optimizer
memory for that half only. Callers can freeze by a predicate too (`frozen=`, e.g. LoRA's "the
whole base tree except the head"). Without anything frozen the plain chain is returned, so the
optimizer state of an ordinary run keeps its structure.

Layer-wise learning-rate decay (`config.optim.layer_decay`; Clark et al. 2020, ELECTRA; Bao et
al. 2022, BEiT): when fine-tuning, lower layers hold more general features and should move
less. With L blocks, block i (0-based, `.../blocks/<i>/...`) learns at lr * decay^(L - i), the
embeddings below the first block at lr * decay^(L + 1), and everything above the last block
(final norm, LM or classifier head) at lr. It scales the finished AdamW update (weight decay
included, as a per-parameter lr would), outside the partition so that L counts every block,
frozen ones too.

Gradient accumulation lives here too (`accumulate_gradients`): the train step runs the
micro-batches in a `lax.scan` and sums gradients of *loss sums*, dividing once by the total
weight, so k micro-batches give exactly the gradient of the one big batch even when micro-
batches hold different numbers of real tokens. (`optax.MultiSteps` averages per-micro-batch
means instead, which differs when token counts differ, and it keeps a persistent gradient
buffer in the checkpoint.)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import einops
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

SCHEDULES = ('cosine', 'linear', 'constant')

# Parameter names (the last path entry) that are never decayed: norm scales and biases.
_NO_DECAY_NAMES = frozenset({'scale', 'bias'})
_EMBEDDING_NAMES = frozenset({'embedding'})

# Where layer-wise decay reads a block index: `blocks/3/...`, `layers/3/...`, `layer/3/...`.
_BLOCK_INDEX = re.compile(r'(?:^|/)(?:blocks|layers|layer)/(\d+)(?:/|$)')


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """`config.optim`, checked once: every bad value is a one-line error naming its field.
  The fields are documented where configs get them (`configlib.optimizer`)."""
  lr: float
  schedule: str = 'cosine'
  warmup_steps: int = 0
  end_lr_factor: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  decay_embeddings: bool = False
  clip_norm: float = 1.0
  freeze: tuple[str, ...] = ()
  layer_decay: float = 1.0

  def __post_init__(self):
    # lr = 0 is allowed (a run whose weights must not move); a negative one would ascend.
    _check_range('lr', self.lr, 0.0, math.inf)
    if self.schedule not in SCHEDULES:
      raise ValueError(f'config.optim.schedule={self.schedule!r}; choose from {SCHEDULES}')
    if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or (
        self.warmup_steps < 0):
      raise ValueError(f'config.optim.warmup_steps={self.warmup_steps!r} must be an int >= 0')
    _check_range('end_lr_factor', self.end_lr_factor, 0.0, 1.0)
    _check_range('b1', self.b1, 0.0, 1.0, upper_open=True)
    _check_range('b2', self.b2, 0.0, 1.0, upper_open=True)
    for name in ('eps', 'weight_decay', 'clip_norm'):
      _check_range(name, getattr(self, name), 0.0, math.inf)
    if not 0.0 < self.layer_decay <= 1.0:
      raise ValueError(f'config.optim.layer_decay={self.layer_decay} must lie in (0, 1]; 1 is '
                       f'off')
    freeze = (self.freeze,) if isinstance(self.freeze, str) else tuple(self.freeze)
    _compile_patterns(freeze, 'config.optim.freeze')  # a bad pattern fails here, not at init
    object.__setattr__(self, 'freeze', freeze)

  @classmethod
  def from_config(cls, optim: ml_collections.ConfigDict) -> OptimConfig:
    return cls(**{f.name: optim[f.name] for f in dataclasses.fields(cls) if f.name in optim})


def _check_range(name: str, value: float, low: float, high: float, *,
                 upper_open: bool = False) -> None:
  inside = low <= value < high if upper_open else low <= value <= high
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not inside:
    bracket = ')' if upper_open or math.isinf(high) else ']'
    raise ValueError(f'config.optim.{name}={value!r} must be a number in [{low}, {high}'
                     f'{bracket}')


def make_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine or linear decay to `lr * end_lr_factor`."""
  if optim.warmup_steps > total_steps:
    raise ValueError(
        f'config.optim.warmup_steps={optim.warmup_steps} must lie in [0, {total_steps}]')
  warmup = optax.linear_schedule(0.0, optim.lr, max(optim.warmup_steps, 1))
  decay_steps = max(total_steps - optim.warmup_steps, 1)
  end_lr = optim.lr * optim.end_lr_factor
  decay = {
      'cosine': optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr_factor),
      'linear': optax.linear_schedule(optim.lr, end_lr, decay_steps),
      'constant': optax.constant_schedule(optim.lr),
  }[optim.schedule]
  if optim.warmup_steps == 0:
    return decay
  return optax.join_schedules([warmup, decay], boundaries=[optim.warmup_steps])


def decay_mask(params: Any, *, decay_embeddings: bool) -> Any:
  """True for parameters that receive weight decay, by their name in the model."""
  skip = _NO_DECAY_NAMES | (frozenset() if decay_embeddings else _EMBEDDING_NAMES)

  def decays(path, _) -> bool:
    return _leaf_name(path) not in skip
  return jax.tree_util.tree_map_with_path(
      decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, 'key', getattr(last, 'name', last)))


def _key_name(key) -> str:
  return str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key))))


def param_path(path: Sequence[Any]) -> str:
  """A pytree key path (or an NNX path tuple) as 'blocks/0/attn/q'."""
  return '/'.join(_key_name(k) for k in path)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _map_paths(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: fn(param_path(path), leaf), tree, is_leaf=_is_variable)


def _compile_patterns(patterns: str | Sequence[str], field: str) -> list[re.Pattern]:
  patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f'{field}: bad regular expression {pattern!r}: {e}') from None
  return compiled


def trainable_mask(params: Any, freeze: str | Sequence[str] = (),
                   frozen: Callable[[str], bool] | None = None) -> Any:
  """True for parameters the optimizer updates: those whose path matches no `freeze` pattern
  (in full) and for which `frozen(path)` is false. A pattern that matches nothing fails: a
  typo would otherwise silently train what was meant to be frozen."""
  compiled = _compile_patterns(freeze, 'config.optim.freeze')
  paths = jax.tree.leaves(_map_paths(lambda path, _: path, params))
  for pattern in compiled:
    if not any(pattern.fullmatch(path) for path in paths):
      raise ValueError(f'config.optim.freeze pattern {pattern.pattern!r} matches no parameter; '
                       f'paths look like {paths[:3]}')

  def trains(path: str, _) -> bool:
    return not (any(p.fullmatch(path) for p in compiled) or
                (frozen is not None and frozen(path)))
  mask = _map_paths(trains, params)
  if not any(jax.tree.leaves(mask)):
    raise ValueError('every parameter is frozen (config.optim.freeze and the PEFT method '
                     'leave nothing to train)')
  return mask


def layer_lr_scale(path: str, num_blocks: int, decay: float) -> float:
  """The factor on the learning rate of the parameter at `path` under layer-wise decay.

  A block is found by `blocks/<i>/` (or `layers/<i>/`, `layer/<i>/`) anywhere in the path, so
  LoRA's `base/...` and `lora/...` copies of a block decay alike. Outside the blocks a path
  containing 'embed' (token, position and token-type tables, BERT's embedding norm) sits below
  block 0; anything else (final norm, LM or classifier head, pooler) above the last block. A
  tied embedding, which is also the output layer, counts as an embedding.
  """
  block = _BLOCK_INDEX.search(path)
  if block:
    return decay ** (num_blocks - int(block.group(1)))
  if 'embed' in path.lower():  # embeddings sit below block 0 (embedding norms too)
    return decay ** (num_blocks + 1)
  return 1.0  # final norm, heads, pooler: above the last block


def scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
  """Multiplies each update by `layer_lr_scale`; the number of blocks is read from the paths."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    indices = [int(m.group(1)) for path in jax.tree.leaves(_map_paths(lambda p, _: p, updates))
               if (m := _BLOCK_INDEX.search(path))]
    if not indices:
      raise ValueError(f'config.optim.layer_decay={decay} needs parameters under '
                       f'blocks/<i>/ (or layers/<i>/); found none')
    num_blocks = max(indices) + 1

    def scale(path: str, update):
      factor = layer_lr_scale(path, num_blocks, decay)
      return jax.tree.map(lambda u: u * jnp.asarray(factor, u.dtype), update)
    return _map_paths(scale, updates), state
  return optax.GradientTransformation(init, update)


def make_optimizer(
    optim: OptimConfig, total_steps: int, *,
    frozen: Callable[[str], bool] | None = None) -> optax.GradientTransformation:
  """The full update rule: clipping and AdamW on a schedule for the trainable parameters,
  nothing for the frozen ones (`config.optim.freeze` patterns, or `frozen(path)` true), then
  layer-wise learning-rate decay when `config.optim.layer_decay` is not 1."""
  layer_decay, freeze = optim.layer_decay, optim.freeze
  schedule = make_schedule(optim, total_steps)
  adamw = optax.adamw(
      schedule,
      b1=optim.b1,
      b2=optim.b2,
      eps=optim.eps,
      weight_decay=optim.weight_decay,
      mask=lambda p: decay_mask(p, decay_embeddings=optim.decay_embeddings),
  )
  tx = adamw if optim.clip_norm <= 0 else optax.chain(
      optax.clip_by_global_norm(optim.clip_norm), adamw)
  if freeze or frozen is not None:
    labels = lambda params: jax.tree.map(
        lambda trains: 'train' if trains else 'frozen', trainable_mask(params, freeze, frozen))
    tx = optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)
  if layer_decay != 1.0:
    tx = optax.chain(tx, scale_by_layer_decay(layer_decay))
  return tx


# (loss_sum, (weight, metric_sums)), grads
LossAndGrad = Callable[[Any, Mapping[str, jax.Array], jax.Array], Any]


def accumulate_gradients(
    loss_and_grad: LossAndGrad,
    params: Any,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    num_micro_batches: int,
) -> tuple[Any, jax.Array, dict[str, Any]]:
  """Sums the loss-sum gradients of `num_micro_batches` slices of `batch`.

  Returns (gradient of the loss *sum*, total weight, summed metrics). With one micro-batch this
  is a single call. Micro-batch i takes rows i, i+k, i+2k, ...: when the batch axis is split
  over devices, every device then holds its share of every micro-batch.
  """
  if num_micro_batches == 1:
    (_, (weight, sums)), grads = loss_and_grad(params, batch, rng)
    return grads, weight, sums

  micro = jax.tree.map(
      lambda x: einops.rearrange(x, '(b k) ... -> k b ...', k=num_micro_batches), batch)

  def one_micro_batch(carry, inputs):
    index, micro_batch = inputs
    grads, weight, sums = carry
    (_, (w, s)), g = loss_and_grad(params, micro_batch, jax.random.fold_in(rng, index))
    return (jax.tree.map(jnp.add, grads, g), weight + w, jax.tree.map(jnp.add, sums, s)), None

  # The carry's shapes come from one abstract evaluation of the loss.
  (_, (w0, s0)), g0 = jax.eval_shape(
      loss_and_grad, params, jax.tree.map(lambda x: x[0], micro), rng)
  zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree)
  init = (zeros(g0), zeros(w0), zeros(s0))
  (grads, weight, sums), _ = jax.lax.scan(
      one_micro_batch, init, (jnp.arange(num_micro_batches), micro))
  return grads, weight, sums

"""LoRA (Hu et al., 2021) as a transformation of the parameter tree, not a new model class.

A LoRA run trains the state

    {'base': the model's own parameters,  'lora': {<kernel path>: {'lora_a': A, 'lora_b': B}}}

and the model is never told: `merge` turns that state back into plain parameters, with
W + (alpha / rank) * A @ B in place of every adapted kernel W, and the train step calls it
inside the differentiated objective (`make_train_step(params_transform=...)`), so gradients
reach A and B through the merged weight. Model classes, step and checkpoints stay as they are,
every model family whose kernels carry logical axes is covered, and export is the same `merge`
(non-destructive: the adapter tree is left as it was, so nothing needs unmerging).

Kernels as linear maps. An einsum kernel of shape [in..., out...] maps its input dims to its
output dims, and A @ B must be read the same way: A is [in..., r], B is [r, out...] and
A @ B is `tensordot(A, B, 1)`, of W's shape. Where the split falls is read from the kernel's
logical axes, with 'embed' (the residual stream) as the landmark:
  * if 'embed' appears after the first dim, every dim before it is input: o [heads, kv] ->
    [embed], mlp down [mlp] -> [embed];
  * otherwise the first dim alone is input: q, k, v [embed] -> [heads, kv], gate/up [embed] ->
    [mlp], lm_head [embed] -> [vocab], embedding [vocab] -> [embed], and kernels without axes.
A and B take their kernel's axes on their in/out dims (None on the rank), so they shard with it.

Initialisation follows the paper: B = 0, so training starts exactly at the base model, and A is
Gaussian, here with std 1/sqrt(fan_in) so x @ A has unit scale whatever the width. Adapters are
float32 whatever the base dtype: their small updates would round away in bfloat16.

What merging inside the step costs. Each adapted kernel is formed merged once per step and
kept for the backward pass, and its full-size gradient is formed on the way to dA and dB: one
extra kernel-sized temporary per adapted layer. Hu et al.'s x W + s (x A) B avoids that, but
needs the adapter inside every layer's forward, a change to each model family. For the sizes
this project fine-tunes the merged form is cheap; the frozen base weights pass through
`stop_gradient`, so no gradient is formed for a frozen weight that is not adapted.

Dropout. Hu et al. drop the adapter's input x; merged weights have no separate low-rank input.
`dropout` = p here drops whole rank components instead: per adapter and per step (per micro-
batch), each of the r components of A is kept with probability 1 - p and scaled by 1 / (1 - p)
(the "rank dropout" of kohya-ss's LoRA, there drawn per example). It is a coarser regulariser
than the paper's, and 0 by default.

Freezing. `is_frozen(cfg)` is the optimizer's predicate (`optim.make_optimizer(frozen=...)`):
every base parameter is frozen except those matching `cfg.trainable` (say, a classifier head),
adapters train; frozen parameters get no update and no Adam moments.

Why not qwix's `LoraProvider` or NNX's `LoRA` modules: both change the model (intercepted
einsums, replaced layers). This keeps one model class per family, handles rank-3 einsum
kernels with their sharding axes, and keeps the base weights a subtree that import and export
address by their usual paths.

Use: a fine-tune puts LoRA's three hooks on its `Task` (`tasks/peft.lora_fields`), and the
loop builds the optimizer with `frozen=lora.is_frozen(cfg)`, adds the adapters at init
(`extend_params=lambda p: lora.add_adapters(p, cfg, key)`) and merges them in every step
(`params_transform=lora.params_transform(cfg)`).
  export_params = lora.merge(state.params, cfg)             # plain params for nnx.merge
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from llmopt_jax import configlib, optim, sharding

METHODS = ('none', 'lora')
# Every attention and MLP kernel (Hu et al. adapt q and v only; adapting all of them is the
# stronger default of later work, e.g. QLoRA, Dettmers et al. 2023).
DEFAULT_TARGETS = (r'.*attn/(q|k|v|o)', r'.*mlp/(gate|up|down)')
_BASE, _ADAPTERS = 'base', 'lora'
# Never adapted, whatever the patterns say: biases ([heads, kv] ones are 2-D) and norm scales,
# known by name as in optim's weight-decay mask.
_NOT_KERNELS = frozenset({'bias', 'scale'})


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 8
  alpha: float = 16.0                      # the update is scaled by alpha / rank
  dropout: float = 0.0                     # rank-component dropout (see the module docstring)
  targets: tuple[str, ...] = DEFAULT_TARGETS  # regexes, matched in full against kernel paths
  trainable: tuple[str, ...] = ()          # base parameters that train too (e.g. a head)

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f'config.peft.rank must be a positive int, got {self.rank!r}')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'config.peft.dropout must lie in [0, 1), got {self.dropout!r}')
    for field in ('targets', 'trainable'):
      object.__setattr__(self, field, configlib.regexes(getattr(self, field),
                                                        f'config.peft.{field}'))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def from_config(peft: ml_collections.ConfigDict) -> LoraConfig | None:
  """The `config.peft` section as a LoraConfig, or None for method 'none' (full fine-tuning).

  Fields: method ('none' | 'lora'), rank, alpha, dropout, targets and trainable (tuples of
  regexes, or one regex as a string), as in `LoraConfig`.
  """
  if peft.method not in METHODS:
    raise ValueError(f'config.peft.method={peft.method!r}; choose from {METHODS}')
  if peft.method == 'none':
    return None
  # A single pattern given as a string on the command line is one pattern, not characters.
  return LoraConfig(rank=peft.rank, alpha=float(peft.alpha), dropout=float(peft.dropout),
                    targets=peft.targets, trainable=peft.trainable)


def input_dims(kernel: nnx.Variable) -> int:
  """How many leading dims of `kernel` are its input (the rule in the module docstring)."""
  axes = sharding.param_axes(kernel)
  return next((i for i in range(1, len(axes)) if axes[i] == 'embed'), 1)


def _path(parts: Sequence[Any]) -> str:
  return optim.param_path(parts)


def matches(patterns: Sequence[str], path: str) -> bool:
  """Whether any of the regexes matches `path` in full."""
  return any(re.fullmatch(p, path) for p in patterns)


def is_kernel(parts: Sequence[Any], var: nnx.Variable) -> bool:
  """A weight matrix (two or more dims), not a bias or a norm scale: what techniques that act
  on kernels (LoRA, quantization) may target."""
  return var.get_value().ndim >= 2 and parts[-1] not in _NOT_KERNELS


def add_adapters(params: nnx.State, cfg: LoraConfig, rng: jax.Array) -> nnx.State:
  """{'base': params, 'lora': adapters}, with B = 0 so the model's function is unchanged.

  Targets are the kernels (two or more dims, not named 'bias' or 'scale') whose path matches a
  `cfg.targets` pattern, so `.*attn/q.*` leaves `attn/q_bias/bias` alone. Fails when no kernel
  matches, or when a `cfg.trainable` pattern matches nothing: a typo would otherwise freeze
  the head silently.
  """
  flat = list(nnx.to_flat_state(params))
  kernels = [(parts, var) for parts, var in flat
             if is_kernel(parts, var) and matches(cfg.targets, _path(parts))]
  if not kernels:
    examples = [_path(parts) for parts, var in flat if is_kernel(parts, var)][:4]
    raise ValueError(f'config.peft.targets {cfg.targets} match no kernel; kernel paths look '
                     f'like {examples}')
  for pattern in cfg.trainable:
    if not any(re.fullmatch(pattern, _path(parts)) for parts, _ in flat):
      raise ValueError(f'config.peft.trainable pattern {pattern!r} matches no parameter')

  # One normal draw sliced into every A: XLA compiles each random draw on its own, and seven
  # per block made compiling the initialisation take seconds even for a tiny model.
  fan_ins = [math.prod(k.get_value().shape[:input_dims(k)]) for _, k in kernels]
  noise = jax.random.normal(rng, (sum(fan_ins) * cfg.rank,), jnp.float32)
  adapters, start = [], 0
  for (parts, kernel), fan_in in zip(kernels, fan_ins):
    shape, axes, n_in = kernel.get_value().shape, sharding.param_axes(kernel), input_dims(kernel)
    a = noise[start:start + fan_in * cfg.rank].reshape(*shape[:n_in], cfg.rank)
    a = a / math.sqrt(fan_in)
    start += fan_in * cfg.rank
    b = jnp.zeros((cfg.rank, *shape[n_in:]), jnp.float32)
    adapters.append((parts + ('lora_a',), _param(a, axes[:n_in] + (None,))))
    adapters.append((parts + ('lora_b',), _param(b, (None,) + axes[n_in:])))
  return nnx.State({_BASE: params, _ADAPTERS: nnx.from_flat_state(adapters)})


def _param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
  # Like the model's own parameters: laid out by the trainer from these names, not eagerly.
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _split(params: nnx.State) -> tuple[nnx.State, nnx.State]:
  if not (isinstance(params, (nnx.State, dict)) and set(params) == {_BASE, _ADAPTERS}):
    raise ValueError("not a LoRA parameter tree: expected the keys 'base' and 'lora' "
                     '(made by lora.add_adapters)')
  return params[_BASE], params[_ADAPTERS]


def merge(params: nnx.State, cfg: LoraConfig, rng: jax.Array | None = None) -> nnx.State:
  """The model's plain parameters: W + (alpha / rank) * A @ B for every adapted kernel.

  With `rng` (training) rank components are dropped with probability `cfg.dropout`; without
  it (evaluation, export) the result is deterministic. Frozen base weights pass through
  `stop_gradient`. `params` itself is left as it was.
  """
  base, adapters = _split(params)
  factors: dict[tuple, dict[str, jax.Array]] = {}
  for parts, var in nnx.to_flat_state(adapters):
    factors.setdefault(tuple(parts[:-1]), {})[parts[-1]] = var.get_value()
  frozen = is_frozen(cfg)

  merged = []
  for index, (parts, var) in enumerate(nnx.to_flat_state(base)):
    w = var.get_value()
    if frozen(f'{_BASE}/{_path(parts)}'):
      w = jax.lax.stop_gradient(w)
    if tuple(parts) in factors:
      a, b = factors[tuple(parts)]['lora_a'], factors[tuple(parts)]['lora_b']
      if rng is not None and cfg.dropout > 0:
        keep = jax.random.bernoulli(jax.random.fold_in(rng, index), 1.0 - cfg.dropout,
                                    (cfg.rank,))
        a = a * (keep / (1.0 - cfg.dropout)).astype(a.dtype)
      delta = cfg.scale * jnp.tensordot(a, b, axes=1)  # [in..., out...], W's shape
      if delta.shape != w.shape:
        raise ValueError(f'LoRA factors of {_path(parts)} give {delta.shape}, the kernel is '
                         f'{w.shape}')
      w = (w.astype(jnp.float32) + delta).astype(w.dtype)
    merged.append((parts, var.replace(w)))
  return nnx.from_flat_state(merged)


def params_transform(cfg: LoraConfig) -> Callable[[nnx.State, jax.Array | None], nnx.State]:
  """`merge` in the form the train and eval steps take (`params_transform=`)."""
  def transform(params: nnx.State, rng: jax.Array | None) -> nnx.State:
    return merge(params, cfg, rng)
  return transform


def is_frozen(cfg: LoraConfig) -> Callable[[str], bool]:
  """The optimizer's predicate on state paths: base parameters are frozen unless they match
  `cfg.trainable` (matched against their path inside the model, without 'base/')."""
  prefix = f'{_BASE}/'

  def frozen(path: str) -> bool:
    return path.startswith(prefix) and not matches(cfg.trainable, path[len(prefix):])
  return frozen


def count_trainable(params: Any, trainable_mask: Any) -> tuple[int, int]:
  """(trainable, total) numbers of parameter entries; `trainable_mask` holds a bool per
  parameter (`optim.trainable_mask`). Works on abstract (eval_shape) trees too."""
  sizes = jax.tree.map(
      lambda trains, var: (bool(trains), sum(math.prod(x.shape) for x in jax.tree.leaves(var))),
      trainable_mask, params)
  pairs = jax.tree.leaves(sizes, is_leaf=lambda x: isinstance(x, tuple))
  return sum(n for trains, n in pairs if trains), sum(n for _, n in pairs)

"""Quantization as transformations of the parameter tree, like LoRA (lora.py).

  targets(params, cfg)            which kernels a recipe quantizes, with their block layouts
  quantize(params, cfg, ...)      PTQ / export: `QuantizedKernel`s (integers + scales) in place
                                  of the target kernels; the model runs them as they are
  fake_quantize(params, cfg, ...) QAT's forward: target kernels rounded to the grid and back,
                                  straight-through gradients (`FakeQuantKernel`s when
                                  activations are quantized too)
  add_scales / params_transform   LSQ: the state {'base': params, 'qscale': step sizes}, and
                                  the step's params transform for either form

Scales come from the current weights (the calibration method of `cfg`, under stop_gradient)
or, with `cfg.scale == 'learned'`, from the trained step sizes (LSQ, Esser et al. 2020), whose
gradient is scaled by 1 / sqrt(block size * qmax) as in the paper so that step sizes and
weights learn at comparable rates.

Why not qwix's QtProvider / PtqProvider: they intercept `jnp.einsum` inside the modules and
tell weights from activations by tracing where each operand came from; this keeps the model
classes and the train step untouched, sees the project's rank-3 attention kernels with their
logical axes, and gives percentile / MSE calibration and LSQ, which qwix lacks. qwix supplies
the integer representation (`QArray`) and the quantized einsum of the inference path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from llmopt_jax import lora, optim
from llmopt_jax.quant import kernels, numerics
from llmopt_jax.quant.config import QuantConfig

_BASE, _SCALES = 'base', 'qscale'
Path = tuple[Any, ...]


def _path(parts: Path) -> str:
  return optim.param_path(parts)


def _depth(paths: list[str]) -> int:
  blocks = [int(m.group(1)) for p in paths for m in [re.search(r'blocks/(\d+)/', p)] if m]
  return max(blocks) + 1 if blocks else 0


def targets(params: nnx.State, cfg: QuantConfig) -> dict[Path, numerics.Layout]:
  """{path: layout} of the kernels `cfg` quantizes. Fails when nothing matches: a typo in a
  pattern would otherwise leave the model silently in float."""
  flat = list(nnx.to_flat_state(params))
  depth = _depth([_path(parts) for parts, _ in flat])
  edges = {'blocks/0/', f'blocks/{depth - 1}/'} if cfg.exclude_first_last else set()
  chosen = {}
  for parts, var in flat:
    path = _path(parts)
    if not lora.is_kernel(parts, var) or not lora.matches(cfg.targets, path):
      continue
    if lora.matches(cfg.exclude, path) or any(e in path for e in edges):
      continue
    table = parts[-1] == 'embedding'
    chosen[tuple(parts)] = numerics.layout(
        var.get_value().shape, lora.input_dims(var), cfg, table=table, name=path)
  if not chosen:
    examples = [_path(p) for p, v in flat if lora.is_kernel(p, v)][:4]
    raise ValueError(f'config.quant.targets {cfg.targets} (minus exclude) match no kernel; '
                     f'kernel paths look like {examples}')
  return chosen


def _scales_for(parts: Path, w: jax.Array, lay: numerics.Layout, cfg: QuantConfig,
                scales: Mapping[Path, jax.Array] | None):
  if scales is not None and parts in scales:
    return scales[parts], None
  scale, zero = numerics.calibrate(jax.lax.stop_gradient(w), lay, cfg)
  return jax.lax.stop_gradient(scale), None if zero is None else jax.lax.stop_gradient(zero)


def _replace_targets(params: nnx.State, cfg: QuantConfig, new_value: Callable) -> nnx.State:
  """`params` with every target kernel's value replaced by new_value(path, w, layout)."""
  chosen = targets(params, cfg)
  out = []
  for parts, var in nnx.to_flat_state(params):
    parts = tuple(parts)
    if parts in chosen:
      var = var.replace(new_value(parts, var.get_value(), chosen[parts]))
    out.append((parts, var))
  return nnx.from_flat_state(out)


def quantize(params: nnx.State, cfg: QuantConfig,
             act_ranges: Mapping[Path, jax.Array] | None = None,
             scales: Mapping[Path, jax.Array] | None = None) -> nnx.State:
  """The model's parameters with integers + scales in place of every target kernel."""
  qtype = jnp.int8 if cfg.bits == 8 else jnp.int4

  def integers(parts: Path, w: jax.Array, lay: numerics.Layout) -> kernels.QuantizedKernel:
    scale, zero = _scales_for(parts, w, lay, cfg, scales)
    q = numerics.integers(w, scale, zero, lay, cfg.bits).astype(qtype)
    weight = qwix.QArray(q, scale.astype(jnp.float32),
                         None if zero is None else zero.astype(qtype), qtype)
    # A table that is only looked up has no range, and needs none.
    act = None if act_ranges is None else act_ranges.get(parts)
    return kernels.QuantizedKernel(weight, act, cfg.activations)
  return _replace_targets(params, cfg, integers)


def fake_quantize(params: nnx.State, cfg: QuantConfig,
                  act_ranges: Mapping[Path, jax.Array] | None = None,
                  scales: Mapping[Path, jax.Array] | None = None) -> nnx.State:
  """QAT's view of the parameters: target kernels on the grid, straight-through gradients."""
  def on_grid(parts: Path, w: jax.Array, lay: numerics.Layout):
    scale, zero = _scales_for(parts, w, lay, cfg, scales)
    if scales is not None and parts in scales:
      scale = _lsq_gradient_scale(scale, lay, cfg.bits)
    value = numerics.fake_quant(w, scale, zero, lay, cfg.bits)
    if cfg.activations == 'none':
      return value
    act = None if act_ranges is None else act_ranges.get(parts)
    return kernels.FakeQuantKernel(value, act, cfg.activations)
  return _replace_targets(params, cfg, on_grid)


def _lsq_gradient_scale(scale: jax.Array, lay: numerics.Layout, bits: int) -> jax.Array:
  """The same step size forward, its gradient times 1 / sqrt(block size * qmax) (LSQ)."""
  g = 1.0 / (lay.block_size * numerics.bounds(bits)[1]) ** 0.5
  return scale * g + jax.lax.stop_gradient(scale - scale * g)


def add_scales(params: nnx.State, cfg: QuantConfig) -> nnx.State:
  """{'base': params, 'qscale': one learnable step-size array per target kernel}, started
  from the calibrated scales (LSQ+ style initialisation rather than the paper's 2<|w|>/sqrt(Q):
  the run then starts exactly at PTQ's model)."""
  scales = []
  for parts, lay in targets(params, cfg).items():
    scale, _ = numerics.calibrate(_get(params, parts), lay, cfg)
    # Replicated: a few floats per output channel, and the group counts need not divide the
    # mesh. Named 'scale' so weight decay leaves them alone (optim.decay_mask).
    scales.append((parts + ('scale',), nnx.Param(
        scale, out_sharding=(None,) * scale.ndim, eager_sharding=False)))
  return nnx.State({_BASE: params, _SCALES: nnx.from_flat_state(scales)})


def _get(params: nnx.State, parts: Path) -> jax.Array:
  node = params
  for p in parts:
    node = node[p]
  return node.get_value()


def split(tree: nnx.State) -> tuple[nnx.State, dict[Path, jax.Array] | None]:
  """(model params, learned scales by kernel path or None) of a plain or LSQ state."""
  if isinstance(tree, (nnx.State, dict)) and set(tree) == {_BASE, _SCALES}:
    learned = {tuple(parts[:-1]): var.get_value()
               for parts, var in nnx.to_flat_state(tree[_SCALES])}
    return tree[_BASE], learned
  return tree, None


def params_transform(cfg: QuantConfig, act_ranges: Mapping[Path, jax.Array] | None = None
                     ) -> Callable[[nnx.State, jax.Array | None], nnx.State]:
  """`fake_quantize` in the form the train and eval steps take (`params_transform=`)."""
  def transform(tree: nnx.State, rng: jax.Array | None) -> nnx.State:
    params, learned = split(tree)
    return fake_quantize(params, cfg, act_ranges, learned)
  return transform

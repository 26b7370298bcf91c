"""Quantization (llmopt_jax.quant): rounding error bounds, straight-through and LSQ gradients,
the integer inference path against fake quantization, calibration methods, config errors,
target selection, and sharded evaluation of a quantized model.

Compilation is what costs time here, so each test's arithmetic runs in one jitted call
(cached where several tests read it): everything one model needs (float logits, and the
integer-path and fake-quant logits of every recipe) is a single compiled program. Models are
tiny and their parameters are drawn with numpy, so building one compiles nothing.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tolerances
from llmopt_jax import optim
from llmopt_jax.hf import load
from llmopt_jax.models import TransformerConfig, heads
from llmopt_jax.quant import calibration, config, kernels, numerics, transform
from llmopt_jax.quant.config import QuantConfig

# LLVM's optimisations take most of the compile time of these small programs and buy
# nothing at this size; the results are IEEE float arithmetic either way.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})

LLAMA = TransformerConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4,
                          num_kv_heads=2, head_dim=8, mlp_dim=64, family='llama')
BERT = TransformerConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4,
                         num_kv_heads=4, head_dim=8, mlp_dim=64, family='bert',
                         max_positions=16, type_vocab_size=2, lm_head=False)
HEAD = heads.HeadConfig(num_labels=5, pooling='mean')
MODELS = {
    'llama_tied': (LLAMA, None),  # tie_embeddings=True is the default
    'llama_untied': (LLAMA.replace(tie_embeddings=False), None),
    'bert': (BERT, HEAD),
}
# 8 rows: the sharded test splits them over the 8 devices.
TOKENS = np.random.default_rng(1).integers(0, LLAMA.vocab_size, size=(8, 8)).astype(np.int32)

RECIPES = {
    'int8': QuantConfig(),
    'int4-g16': QuantConfig(bits=4, granularity='per_group', group_size=16),
    'int4-asym': QuantConfig(bits=4, symmetric=False),
    'int4-asym-g16': QuantConfig(bits=4, granularity='per_group', group_size=16,
                                 symmetric=False),
    'int8-a8dyn': QuantConfig(activations='dynamic'),
    'int8-a8': QuantConfig(activations='static'),
    'int8-tensor-a8': QuantConfig(granularity='per_tensor', activations='static'),
    # Groups inside an int8 x int8 contraction (one int32 partial sum per group).
    'int4-g16-a8dyn': QuantConfig(bits=4, granularity='per_group', group_size=16,
                                  activations='dynamic'),
}
# Every recipe on the tied LM (whose embedding is both looked up and contracted); the BERT
# classifier's table is only looked up (`QuantizedKernel.take`); the untied LM adds lm_head.
MODEL_RECIPES = {
    'llama_tied': ('int8', 'int4-g16', 'int4-asym', 'int8-a8dyn', 'int8-a8'),
    'bert': ('int8', 'int4-asym-g16', 'int8-tensor-a8', 'int4-g16-a8dyn'),
    'llama_untied': ('int4-asym-g16',),
}
SHARDED_RECIPES = ('int4-g16', 'int8-a8dyn')


def abstract_params(cfg: TransformerConfig, head: heads.HeadConfig | None) -> nnx.State:
  return nnx.state(nnx.eval_shape(lambda: load.build(cfg, head, nnx.Rngs(0))), nnx.Param)


@functools.cache
def model(name: str) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, float params) of a tiny model: random kernels (std 0.1, larger than the
  init's, so that attention is not uniform), gains near 1, non-zero biases."""
  cfg, head = MODELS[name]
  abstract = nnx.eval_shape(lambda: load.build(cfg, head, nnx.Rngs(0)))
  graphdef = nnx.graphdef(abstract)
  rng = np.random.default_rng(0)
  flat = []
  for parts, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    shape = var.get_value().shape
    value = rng.normal(size=shape) * (0.05 if parts[-1] == 'bias' else 0.1)
    value = value + 1.0 if parts[-1] == 'scale' else value
    flat.append((parts, var.replace(jnp.asarray(value, jnp.float32))))
  return graphdef, nnx.from_flat_state(flat)


def forward(module, batch):
  return module(batch['inputs'])


@functools.cache
def outputs(name: str):
  """({'float': logits, recipe: (integer-path logits, fake-quant logits)}, {recipe: the
  quantized params}) for model `name`, from one compiled call."""
  graphdef, params = model(name)
  recipes = {k: RECIPES[k] for k in MODEL_RECIPES[name]}

  @jit
  def run(params, tokens):
    batch = {'inputs': tokens}
    logits = lambda p: forward(nnx.merge(graphdef, p), batch)
    out, quantized = {'float': logits(params)}, {}
    for key, cfg in recipes.items():
      ranges = None
      if cfg.activations == 'static':  # calibrated on the batch the test evaluates
        ranges = calibration.activation_ranges(graphdef, params, cfg, forward, [batch])
      quantized[key] = transform.quantize(params, cfg, ranges)
      out[key] = (logits(quantized[key]), logits(transform.fake_quantize(params, cfg, ranges)))
    return out, quantized

  return run(params, TOKENS)


def leaf(tree, parts):
  """The value at path `parts` of a parameter tree."""
  return functools.reduce(lambda node, p: node[p], parts, tree).get_value()


def flat(tree) -> dict:
  return {optim.param_path(p): v.get_value() for p, v in nnx.to_flat_state(tree)}


def broadcast_stat(stat, lay: numerics.Layout) -> np.ndarray:
  """A scale-shaped array at w's shape: groups repeated along the group axis."""
  stat = np.asarray(stat)
  if lay.group_axis is not None:
    stat = np.repeat(stat, lay.group, axis=lay.group_axis)
  return np.broadcast_to(stat, lay.shape)


# (shape, input dims, group size): a q/k/v-like kernel [embed, heads, head_dim], an output
# projection [heads, head_dim, embed] (grouped along head_dim), and an MLP matrix.
KERNELS = (((32, 4, 8), 1, 8), ((4, 8, 32), 2, 4), ((64, 16), 1, 16))


def _weights(shape, seed, offset=0.0) -> np.ndarray:
  """Normal weights with a different spread per output column (so the scales differ)."""
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) * rng.uniform(0.2, 2.0, size=shape[-1:]) + offset).astype(
      np.float32)


# --- 1. Rounding error bound. ---------------------------------------------------------------

GRANULARITIES = ('per_tensor', 'per_channel', 'per_group')


def _recipe(granularity, bits, symmetric, kernel) -> tuple[np.ndarray, numerics.Layout, int]:
  shape, input_dims, group = KERNELS[kernel]
  cfg = QuantConfig(bits=bits, granularity=granularity, group_size=group, symmetric=symmetric)
  w = _weights(shape, kernel, offset=0.0 if symmetric else 0.3)  # offset: zero points != 0
  return w, numerics.layout(shape, input_dims, cfg), cfg


@functools.cache
def rounding():
  """{(granularity, bits, symmetric, kernel): (w, layout, scale, zero, fake_quant, ints)}."""
  cases = {(g, b, s, k): _recipe(g, b, s, k) for g in GRANULARITIES for b in (8, 4)
           for s in (True, False) for k in range(len(KERNELS))}

  @jit
  def run(ws):
    out = {}
    for key, (_, lay, cfg) in cases.items():
      w = ws[key]
      scale, zero = numerics.calibrate(w, lay, cfg)
      out[key] = (scale, zero, numerics.fake_quant(w, scale, zero, lay, cfg.bits),
                  numerics.integers(w, scale, zero, lay, cfg.bits))
    return out

  results = run({key: w for key, (w, _, _) in cases.items()})
  return {key: (cases[key][0], cases[key][1], *results[key]) for key in cases}


@pytest.mark.parametrize('symmetric', [True, False])
@pytest.mark.parametrize('bits', [8, 4])
@pytest.mark.parametrize('granularity', GRANULARITIES)
def test_fake_quant_error_is_at_most_half_a_step(granularity, bits, symmetric):
  qmin, qmax = numerics.bounds(bits)
  for kernel, (shape, input_dims, group) in enumerate(KERNELS):
    w, lay, scale, zero, fq, q = rounding()[granularity, bits, symmetric, kernel]
    expected_scales = {
        'per_tensor': (1,) * len(shape),
        'per_channel': (1,) * input_dims + shape[input_dims:],
        # Groups along the last input dim; any other input dim keeps a scale per index (a
        # group never spans two heads of the output projection).
        'per_group': tuple(n // group if a == input_dims - 1 else n
                           for a, n in enumerate(shape)),
    }[granularity]
    assert scale.shape == lay.scale_shape == expected_scales, (shape, granularity)
    assert (zero is None) == symmetric
    s = broadcast_stat(scale, lay)
    z = 0.0 if zero is None else broadcast_stat(zero, lay)
    err = np.abs(np.asarray(fq) - w)
    # |w / s| <= 128 steps, so float32 division is off by < 1e-5 step: hence the 1e-4.
    assert np.all(err <= s * (0.5 + 1e-4)), (shape, float(np.max(err / s)))
    assert np.max(err / s) > 0.4  # the bound is tight: some weight needs ~ half a step
    # The values lie on the grid: integers in [qmin, qmax] that use the range (absmax), and
    # fake quantization is exactly what the integer path stores.
    q = np.asarray(q).astype(np.int32)
    assert q.min() >= qmin and q.max() <= qmax
    assert q.max() - q.min() > (qmax - qmin) // 2
    # A small integer times a float32 scale is one correctly rounded product on both sides.
    np.testing.assert_array_equal(((q - z) * s).astype(np.float32), fq)


# --- 2. Straight-through gradients. ---------------------------------------------------------

STE_CASES = ((8, True, 0), (4, False, 1), (4, True, 2))  # (bits, symmetric, kernel)


@functools.cache
def ste():
  """Gradients of sum(fake_quant(w) * g) w.r.t. w, with scales too small on purpose (the
  largest weights of every block clip), and of the int8 activation fake-quant."""
  weights, cases = {}, {}
  for bits, symmetric, kernel in STE_CASES:
    w, lay, cfg = _recipe('per_group', bits, symmetric, kernel)
    weights[bits, symmetric, kernel] = w
    cases[bits, symmetric, kernel] = (lay, cfg)
  g = {key: np.random.default_rng(7).normal(size=w.shape).astype(np.float32)
       for key, w in weights.items()}
  x = np.random.default_rng(1).uniform(-4.0, 4.0, size=(2, 5, 16)).astype(np.float32)
  gx = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
  spec, act_range = 'BTD,DF->BTF', 2.0

  @jit
  def run(weights, g, x, gx):
    out = {}
    for key, (lay, cfg) in cases.items():
      scale, zero = numerics.calibrate(weights[key], lay, cfg)
      scale = scale * 0.6
      loss = lambda w: jnp.sum(numerics.fake_quant(w, scale, zero, lay, cfg.bits) * g[key])
      out[key] = (scale, zero, jax.grad(loss)(weights[key]))
    act = lambda r: lambda x: jnp.sum(kernels.fake_quant_activations(spec, x, r) * gx)
    static = jnp.float32(act_range)
    return out, (kernels.fake_quant_activations(spec, x, static), jax.grad(act(static))(x),
                 jax.grad(act(None))(x))

  return weights, cases, g, (x, gx, act_range), run(weights, g, x, gx)


@pytest.mark.parametrize('bits,symmetric,kernel', STE_CASES)
def test_weight_ste_gradient_is_one_inside_and_zero_where_clipped(bits, symmetric, kernel):
  weights, cases, g, _, (out, _) = ste()
  key = bits, symmetric, kernel
  w, (lay, _), (scale, zero, grad) = weights[key], cases[key], out[key]
  v = w / broadcast_stat(scale, lay) + (0.0 if zero is None else broadcast_stat(zero, lay))
  qmin, qmax = numerics.bounds(bits)
  grad, g = np.asarray(grad), g[key]
  # More than half a step away from the grid's ends (the ends: the test below).
  inside = (v > qmin + 0.51) & (v < qmax - 0.51)
  clipped = (v > qmax + 0.51) | (v < qmin - 0.51)
  assert inside.sum() > w.size // 3 and clipped.sum() > 0
  # Inside, the chain rule multiplies g by 1 / s and by s: two roundings (1e-6 is 8 eps32).
  np.testing.assert_allclose(grad[inside], g[inside], rtol=1e-6)
  np.testing.assert_array_equal(grad[clipped], 0.0)  # a zero mask: exactly 0


def test_activation_ste_gradient_with_a_static_range():
  *_, (x, g, act_range), (_, out) = ste()
  y, grad, grad_dynamic = (np.asarray(a) for a in out)
  step = act_range / kernels.ACT_MAX
  v = x / step
  # On the int8 grid: y = q * step and y / step each round by half an ulp of up to 128.
  np.testing.assert_allclose(y / step, np.round(y / step), atol=2 * 128 * tolerances.EPS32)
  # Within the range, up to the rounding of 127 * (range / 127) (1e-6 is 8 eps32).
  assert y.max() <= act_range * (1 + 1e-6) and y.min() >= -128 * step * (1 + 1e-6)
  inside = (v > -127.49) & (v < 126.49)
  clipped = (v > 127.51) | (v < -128.51)
  assert inside.sum() > x.size // 3 and clipped.sum() > x.size // 3
  np.testing.assert_allclose(grad[inside], g[inside], rtol=1e-6)  # g / s * s, as above
  np.testing.assert_array_equal(grad[clipped], 0.0)
  # Dynamic (per token) ranges never clip: the gradient is the identity everywhere, each
  # token's extreme (which lands exactly on the grid's end) included.
  np.testing.assert_allclose(grad_dynamic, g, rtol=1e-6)


def test_ste_gradient_is_one_for_values_inside_the_range_that_round_onto_its_ends():
  v = np.array([126.7, 126.9, -127.8, -127.6, 3.2], np.float32)  # all inside [-128, 127]
  lay = numerics.layout((5, 1), 1, QuantConfig(granularity='per_tensor'))

  @jit
  def grads(v):
    grad_w = jax.grad(lambda w: jnp.sum(numerics.fake_quant(
        w, jnp.ones((1, 1)), None, lay, 8)))(v[:, None])[:, 0]
    grad_x = jax.grad(lambda x: jnp.sum(kernels.fake_quant_activations(
        'BD,DF->BF', x, jnp.float32(127.0))))(v[None])[0]  # step 127 / 127 = 1
    return grad_w, grad_x

  grad_w, grad_x = grads(v)  # scales of 1: every factor exact
  np.testing.assert_array_equal(grad_w, 1.0)
  np.testing.assert_array_equal(grad_x, 1.0)


# --- 3. LSQ: learned step sizes. ------------------------------------------------------------


def test_lsq_scale_gradient_is_the_papers():
  """d/ds sum(g * fq(w; s)) = gs * sum over the block of g * (round(v) - v) where v = w / s
  is inside the grid and g * qmin (qmax) where it is clipped; gs = 1 / sqrt(block * qmax)."""
  cfg = QuantConfig(bits=4, scale='learned')
  qmin, qmax = numerics.bounds(4)
  rng = np.random.default_rng(3)
  v = rng.uniform(-12.0, 12.0, size=(16, 6)).astype(np.float32)
  v[np.abs(v - qmax) < 0.6] += 1.5  # no value within half a step of the grid's ends
  v[np.abs(v - qmin) < 0.6] -= 1.5
  s = np.linspace(0.05, 0.3, 6, dtype=np.float32)[None]
  w = (v * s).astype(np.float32)
  v = w / s  # as the kernel computes it
  g = rng.normal(size=w.shape).astype(np.float32)
  params = nnx.State({'mlp': {'up': nnx.Param(jnp.asarray(w), out_sharding=('embed', 'mlp'),
                                              eager_sharding=False)}})
  apply = transform.params_transform(cfg)

  @jit
  def run(params, s):
    tree = transform.add_scales(params, cfg)
    initial = tree['qscale']['mlp']['up']['scale'].get_value()
    tree['qscale']['mlp']['up']['scale'].set_value(s)
    loss = lambda t: jnp.sum(apply(t, None)['mlp']['up'].get_value() * g)
    return initial, jax.grad(loss)(tree)

  initial, grads = run(params, s)
  # Started from absmax calibration: a division (or a product with 1 / qmax, two roundings).
  np.testing.assert_allclose(initial, np.max(np.abs(w), axis=0, keepdims=True) / qmax,
                             rtol=1e-6)
  inside = (v >= qmin) & (v <= qmax)
  assert 0 < inside.sum() < inside.size
  dfq_ds = np.where(inside, np.round(v) - v, np.clip(v, qmin, qmax))
  expected = np.sum(g * dfq_ds, axis=0, keepdims=True) / np.sqrt(16 * qmax)
  # Float32 sums over the 16-row blocks on both sides, a few roundings per term.
  magnitude = np.sum(np.abs(g * dfq_ds), axis=0, keepdims=True) / np.sqrt(16 * qmax)
  tolerances.assert_close(grads['qscale']['mlp']['up']['scale'].get_value(), expected,
                          tolerances.sum_tolerance(16 + 3, magnitude))
  np.testing.assert_allclose(grads['base']['mlp']['up'].get_value(), np.where(inside, g, 0.0),
                             rtol=1e-6)  # g / s * s inside, exactly 0 outside


def test_lsq_starts_at_the_ptq_model_and_learns_every_scale():
  _, params = model('llama_tied')
  cfg = QuantConfig(bits=4, scale='learned')
  apply = transform.params_transform(cfg)
  chosen = transform.targets(params, cfg)
  g = {parts: np.random.default_rng(i).normal(size=lay.shape).astype(np.float32)
       for i, (parts, lay) in enumerate(chosen.items())}

  @jit
  def run(params):
    tree = transform.add_scales(params, cfg)
    want = {parts: numerics.calibrate(leaf(params, parts), lay, cfg)[0]
            for parts, lay in chosen.items()}

    def loss(tree):  # a random projection of every quantized kernel
      values = apply(tree, None)
      return sum(jnp.sum(leaf(values, parts) * g_k) for parts, g_k in g.items())
    return (want, tree, jax.grad(loss)(tree), apply(tree, None),
            transform.fake_quantize(params, cfg))

  want, tree, grads, learned, calibrated = run(params)
  scales, scale_grads = flat(tree['qscale']), flat(grads['qscale'])
  assert len(scales) == len(chosen) == 7 * LLAMA.num_layers + 1  # + the tied embedding
  for parts, lay in chosen.items():
    path = optim.param_path(parts) + '/scale'
    # The same calibration arithmetic (a max, a division): a rounding or two apart at most.
    np.testing.assert_allclose(scales[path], want[parts], rtol=1e-6, err_msg=path)
    grad = np.asarray(scale_grads[path])
    assert grad.shape == lay.scale_shape and np.all(np.isfinite(grad)), path
    assert np.all(grad != 0), path
  assert all(np.all(np.isfinite(v)) for v in flat(grads['base']).values())
  # At initialisation the LSQ state's view of the model is the calibrated (PTQ) one.
  learned, calibrated = flat(learned), flat(calibrated)
  assert learned.keys() == calibrated.keys()
  # The LSQ view reaches the same scales by other float32 operations, an ulp or two apart: a
  # weight is q * s up to 4 eps32 of itself, unless w / s lies within an ulp of a rounding
  # boundary and rounds to the neighbouring q, one step s away. Such weights are about
  # |w / s| * eps32 <= 8 eps32 of them, 1e-6; each leaf may hold one in 512.
  qmax = numerics.bounds(cfg.bits)[1]
  for path, value in calibrated.items():
    value = np.asarray(value)
    tolerances.assert_close_but_a_few(learned[path], value, 4 * tolerances.EPS32 * np.abs(value),
                                      np.max(np.abs(value)) / qmax, 1 / 512, err_msg=path)


# --- 4. Integer path == fake quantization; 5. close to float. -------------------------------


def float_tolerance(name: str, logits) -> float:
  """How far two float32 forward passes of model `name` may drift apart (tests/tolerances.py):
  eps32 times the terms summed along the path, relative to the largest logit."""
  terms = tolerances.forward_terms(MODELS[name][0], TOKENS.shape[1])
  return tolerances.sum_tolerance(terms, float(np.max(np.abs(logits))))


def assert_same_quantized_logits(got, want, name: str, recipe: str, reference) -> None:
  """Logits of one quantized model from two programs whose float sums differ in order.

  With int8 activations a sum is rounded again, to the activation grid, before the next
  layer: an activation within an ulp of a rounding boundary rounds one way in one program and
  the other way in the other. Such a flip moves one of the model's ~1e4 roundings by a whole
  step, so its sequence's logits move by less than the recipe's quantization error as a whole,
  max |fake quant - float| (`reference` being the float logits); it reaches no other sequence.
  About 1e4 activations per pass, an ulp or so apart at |x| / step <= 127, flip with a chance of
  about 127 eps32 / 2 each: a tenth of a flip per pass (measured: 1% of sequences). Two
  sequences (a quarter of the values) may flip; a third is a chance near 1e-4.
  """
  got, want = np.asarray(got), np.asarray(want)
  tol = float_tolerance(name, want)
  if RECIPES[recipe].activations == 'none':
    np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=recipe)
  else:
    step = float(np.max(np.abs(want - np.asarray(reference))))
    tolerances.assert_close_but_a_few(got, want, tol, step, 2 / len(TOKENS), err_msg=recipe)


@pytest.mark.parametrize('name', list(MODELS))
def test_integer_path_equals_fake_quant_forward(name):
  out, quantized = outputs(name)
  for key in MODEL_RECIPES[name]:
    integer, fake = out[key]
    # The same integers and scales on both paths; only the order of the float sums differs
    # (and, with int8 activations, where the scales are applied: after an exact int32 dot).
    assert_same_quantized_logits(integer, fake, name, key, out['float'])
    assert not np.allclose(integer, out['float'], rtol=0, atol=float_tolerance(name, fake)), key
  # The quantized parameters hold integers, in every target kernel and nowhere else.
  for key in MODEL_RECIPES[name]:
    cfg, values = RECIPES[key], flat(quantized[key])
    chosen = {optim.param_path(p) for p in transform.targets(model(name)[1], cfg)}
    assert {p for p, v in values.items() if isinstance(v, kernels.QuantizedKernel)} == chosen
    names = {p.rsplit('/', 1)[-1] for p in chosen}
    assert 'embedding' in names and ('lm_head' in names) == (name == 'llama_untied')
    for path in chosen:
      kernel = values[path]
      assert kernel.weight.qvalue.dtype == (jnp.int8 if cfg.bits == 8 else jnp.int4), path
      assert kernel.weight.scale.dtype == jnp.float32
      assert kernel.activations == cfg.activations
      assert (kernel.weight.zero_point is None) == cfg.symmetric
      # A static range for every kernel that multiplies activations; a table that is only
      # looked up (BERT's embedding) has none and needs none.
      contracted = path != 'backbone/embedding'
      assert (kernel.act_range is not None) == (cfg.activations == 'static' and contracted)


@pytest.mark.parametrize('name', ['llama_tied', 'bert'])
def test_int8_is_close_to_float_and_int4_further(name):
  out, _ = outputs(name)
  ref = np.asarray(out['float'])
  top = np.max(np.abs(ref))
  err = {key: np.max(np.abs(np.asarray(out[key][0]) - ref)) / top for key in MODEL_RECIPES[name]}
  # A few % for int8 weights (a little more with int8 activations too); int4's 16 levels
  # against int8's 256 are far coarser: several times the error.
  assert 0 < err['int8'] < 0.05, err
  for key in MODEL_RECIPES[name]:
    if RECIPES[key].bits == 8:
      assert err[key] < (0.05 if RECIPES[key].activations == 'none' else 0.1), err
    else:
      assert err[key] > 3 * err['int8'], err


# --- 6. Calibration methods. ----------------------------------------------------------------


def test_percentile_and_mse_clip_an_outlier_and_mse_error_is_never_worse():
  w = np.random.default_rng(4).normal(size=(256, 4)).astype(np.float32)
  w[17, 1] = 8.0  # an outlier in output channel 1
  weights = {-1: w, **{i: _weights(KERNELS[i][0], 20 + i, offset=0.2 * i) for i in range(2)}}
  shapes = {-1: (w.shape, 1, 64), **dict(enumerate(KERNELS[:2]))}
  channel = numerics.layout(w.shape, 1, QuantConfig())
  methods = {(m, b): QuantConfig(bits=b, calibration=m, percentile=99.0)
             for m in ('absmax', 'percentile', 'mse') for b in (4, 8)}
  methods['percentile100', 8] = QuantConfig(calibration='percentile', percentile=100.0)
  blocks = {}  # (kernel, recipe) -> (layout, absmax config, mse config)
  for i, (shape, input_dims, group) in shapes.items():
    for bits, symmetric, granularity in ((4, True, 'per_channel'), (4, False, 'per_group'),
                                         (8, True, 'per_tensor')):
      cfg = dict(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group)
      blocks[i, bits, symmetric, granularity] = (
          numerics.layout(shape, input_dims, QuantConfig(**cfg)), QuantConfig(**cfg),
          QuantConfig(calibration='mse', **cfg))

  @jit
  def run(weights):
    scales = {key: numerics.calibrate(weights[-1], channel, cfg)[0]
              for key, cfg in methods.items()}
    fq = {}
    for key, (lay, *cfgs) in blocks.items():
      for j, cfg in enumerate(cfgs):
        scale, zero = numerics.calibrate(weights[key[0]], lay, cfg)
        fq[key + (j,)] = numerics.fake_quant(weights[key[0]], scale, zero, lay, cfg.bits)
    return scales, fq

  scales, fq = run(weights)
  scales = {key: np.asarray(s)[0] for key, s in scales.items()}
  # The outlier's channel gets a smaller scale; the others hardly move. At 8 bits rounding
  # costs so little that MSE may well keep the outlier: only 4 bits are asserted for it.
  for key in (('percentile', 4), ('mse', 4), ('percentile', 8)):
    assert scales[key][1] < 0.95 * scales['absmax', key[1]][1], (key, scales)
  # The 100th percentile is the largest |w| itself; then the same division.
  np.testing.assert_allclose(scales['percentile100', 8], scales['absmax', 8], rtol=1e-6)

  for key, (lay, *_) in blocks.items():
    block_of = broadcast_stat(np.arange(np.prod(lay.scale_shape)).reshape(lay.scale_shape),
                              lay).reshape(-1)
    x = weights[key[0]].astype(np.float64)
    absmax, mse = (np.bincount(block_of, np.square(np.asarray(fq[key + (j,)]) - x).reshape(-1))
                   for j in (0, 1))
    assert len(absmax) == np.prod(lay.scale_shape)
    # MSE picks the smaller of float32 block sums of squares (absmax's scale among its
    # candidates); recomputed in float64 here, each may move by its sum's rounding.
    slack = tolerances.sum_tolerance(2 * lay.block_size, 1.0)
    assert np.all(mse <= absmax * (1 + slack)), key
    if key[1] == 4:
      assert np.sum(mse) < np.sum(absmax), key


# --- 7. Config errors. ----------------------------------------------------------------------


@pytest.mark.parametrize('fields,field', [
    ({'bits': 3}, 'bits'), ({'bits': '4.5'}, 'bits'), ({'bits': True}, 'bits'),
    ({'granularity': 'per_row'}, 'granularity'), ({'activations': 'int8'}, 'activations'),
    ({'calibration': 'minmax'}, 'calibration'), ({'scale': 'lsq'}, 'scale'),
    ({'bitz': 8}, 'bitz'), ({'group_size': 0}, 'group_size'),
    ({'percentile': 40.0}, 'percentile'), ({'targets': ('(',)}, 'targets'),
    ({'scale': 'learned', 'symmetric': False}, 'scale')])
def test_config_errors_name_the_field(fields, field):
  with pytest.raises(ValueError, match=rf'config\.quant\.{field}\b') as e:
    config.from_config(ml_collections.ConfigDict(fields))
  assert '\n' not in str(e.value)


def test_config_round_trip_and_kernel_dependent_errors():
  assert config.from_config(config.section()) == QuantConfig()
  cfg = config.from_config(ml_collections.ConfigDict({'bits': 4.0, 'targets': '.*mlp/up'}))
  assert cfg.bits == 4 and cfg.targets == ('.*mlp/up',) and cfg.name == 'int4'
  params = abstract_params(LLAMA, None)
  with pytest.raises(ValueError, match=r'config\.quant\.group_size=12\b') as e:
    transform.targets(params, QuantConfig(granularity='per_group', group_size=12))
  assert '\n' not in str(e.value) and 'blocks/0/attn/' in str(e.value)
  with pytest.raises(ValueError, match=r'config\.quant\.targets') as e:
    transform.targets(params, QuantConfig(targets=(r'.*attention/q_proj',)))
  assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match=r'config\.quant\.targets'):  # everything excluded
    transform.targets(params, QuantConfig(targets=(r'.*mlp/up',), exclude=(r'blocks/.*',)))


# --- 8. Targets. ----------------------------------------------------------------------------


def test_default_targets_of_a_bert_classifier():
  params = abstract_params(BERT.replace(num_layers=3), HEAD)
  paths = {optim.param_path(p) for p, _ in nnx.to_flat_state(params)}
  expected = {f'backbone/blocks/{i}/{m}' for i in range(3)
              for m in ('attn/q', 'attn/k', 'attn/v', 'attn/o', 'mlp/up', 'mlp/down')}
  expected.add('backbone/embedding')
  assert expected <= paths
  chosen = {optim.param_path(p): lay
            for p, lay in transform.targets(params, QuantConfig()).items()}
  assert set(chosen) == expected
  # Never: the classifier head, position / token-type tables, biases, norm gains.
  for path in ('classifier/kernel', 'classifier/bias', 'backbone/position_embed/embedding',
               'backbone/token_type_embed/embedding', 'backbone/blocks/0/attn/q_bias/bias',
               'backbone/embed_norm/scale', 'backbone/blocks/0/mlp_norm/scale'):
    assert path in paths and path not in chosen, path
  # A table's blocks are its rows; the output projection contracts heads and head_dim.
  assert chosen['backbone/embedding'].scale_shape == (BERT.vocab_size, 1)
  assert chosen['backbone/blocks/0/attn/o'].scale_shape == (1, 1, BERT.embed_dim)
  assert chosen['backbone/blocks/0/attn/q'].scale_shape == (1, 4, 8)
  edges = {optim.param_path(p) for p in transform.targets(
      params, QuantConfig(exclude_first_last=True))}
  assert edges == {p for p in expected if '/blocks/1/' in p} | {'backbone/embedding'}


def test_per_group_blocks_of_the_output_projection_stay_within_one_head():
  lay = numerics.layout((4, 8, 32), 2, QuantConfig(granularity='per_group', group_size=4))
  assert (lay.block_size, lay.scale_shape) == (4, (4, 2, 32))
  wide = numerics.layout((4, 8, 32), 2, QuantConfig(granularity='per_group', group_size=128))
  channel = numerics.layout((4, 8, 32), 2, QuantConfig(granularity='per_channel'))
  assert wide.block_size == 8 < channel.block_size


# --- 9. Sharded == single device. -----------------------------------------------------------


def test_sharded_quantized_logits_equal_single_device():
  graphdef, _ = model('llama_tied')
  out, quantized = outputs('llama_tied')
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8), ('data',))
  qparams = jax.device_put({k: quantized[k] for k in SHARDED_RECIPES},
                           NamedSharding(mesh, P()))
  tokens = jax.device_put(TOKENS, NamedSharding(mesh, P('data')))
  logits = jit(lambda qp, t: {k: nnx.merge(graphdef, p)(t) for k, p in qp.items()})(
      qparams, tokens)
  for key in SHARDED_RECIPES:
    assert len(logits[key].sharding.device_set) == 8
    # One row per device against eight in one matmul: the float sums may be tiled otherwise.
    assert_same_quantized_logits(logits[key], out[key][0], 'llama_tied', key, out['float'])

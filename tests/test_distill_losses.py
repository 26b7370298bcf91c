"""Tests of the distillation losses and schedules: closed forms and invariants, no model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tolerances
from llmopt_jax.distill import losses as kd
from llmopt_jax.distill import schedules

# Jitted once per static argument: one compilation per call pattern instead of one per
# primitive in eager mode keeps the file fast, and the temperature is traced as in training.
logit_kd = jax.jit(kd.logit_kd, static_argnames='divergence')
topk_kd = jax.jit(kd.topk_kd)
hidden_state_loss = jax.jit(kd.hidden_state_loss, static_argnames='kind')
attention_loss = jax.jit(kd.attention_loss, static_argnames='kind')


def normal(seed, shape, scale=1.0):
  # numpy, not jax.random: inputs cost no compilation, which dominates a CPU test's time.
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def np_softmax(x):
  e = np.exp(x - np.max(x, axis=-1, keepdims=True))
  return e / np.sum(e, axis=-1, keepdims=True)


# Logit distillation.

@pytest.mark.parametrize('divergence', kd.DIVERGENCES)
def test_logit_kd_zero_iff_equal(divergence):
  s, t = normal(0, (3, 5, 11)), normal(1, (3, 5, 11))
  w = jnp.ones((3, 5))
  same, count = logit_kd(s, s, w, temperature=2.0, divergence=divergence)
  # KL: log p - log q of the same values is exactly 0. JS: log m = logaddexp(log p, log p) -
  # log 2 rounds log p by up to an ulp of |log p| + log 2, and p-weighted that is at most
  # eps32 (log V + 1) per position, times T^2 and the 15 positions.
  bound = 15 * 2.0**2 * tolerances.sum_tolerance(1, np.log(11) + 1)
  assert abs(float(same)) <= bound and float(count) == 15
  different, _ = logit_kd(s, t, w, temperature=2.0, divergence=divergence)
  assert float(different) > 1e-3 > bound


@pytest.mark.parametrize('temperature', [1.0, 2.0, 4.0])
def test_forward_kl_gradient_matches_closed_form(temperature):
  # d/ds of T^2 KL(softmax(t/T) || softmax(s/T)) = T (softmax(s/T) - softmax(t/T)).
  s, t = normal(2, (4, 7), 3.0), normal(3, (4, 7), 3.0)
  grad = jax.grad(lambda s: logit_kd(s, t, jnp.ones(4), temperature=temperature)[0])(s)
  expected = (np_softmax(np.asarray(s) / temperature)
              - np_softmax(np.asarray(t) / temperature)) * temperature
  # Each float32 softmax: a 7-term sum, an exp and a division of probabilities <= 1; the
  # gradient is T times the difference of two.
  np.testing.assert_allclose(grad, expected,
                             atol=2 * temperature * tolerances.sum_tolerance(7 + 2, 1.0))


@pytest.mark.parametrize('divergence', kd.DIVERGENCES)
def test_no_gradient_to_teacher(divergence):
  s, t = normal(4, (2, 3, 6)), normal(5, (2, 3, 6))
  grad = jax.grad(lambda t: logit_kd(
      s, t, jnp.ones((2, 3)), temperature=2.0, divergence=divergence)[0])(t)
  assert np.all(np.asarray(grad) == 0.0)


def test_reverse_is_swapped_forward_and_js_is_symmetric_and_bounded():
  s, t = normal(6, (8, 9), 4.0), normal(7, (8, 9), 4.0)
  w = jnp.ones(8)
  reverse, _ = logit_kd(s, t, w, temperature=1.0, divergence='reverse')
  swapped, _ = logit_kd(t, s, w, temperature=1.0, divergence='forward')
  # The same operations on the same values, compiled as two programs: at most their two
  # 9-term sums per row (log-softmax, KL) and the 8 rows in another order. Far-apart
  # distributions: the KL's terms are mostly positive, their absolute values about the KL.
  rtol = tolerances.sum_tolerance(2 * 9 + 8, 1.0)
  np.testing.assert_allclose(reverse, swapped, rtol=rtol)
  js_st, _ = logit_kd(s, t, w, temperature=1.0, divergence='js')
  js_ts, _ = logit_kd(t, s, w, temperature=1.0, divergence='js')
  np.testing.assert_allclose(js_st, js_ts, rtol=rtol)
  # Nearly disjoint distributions approach the bound T^2 log 2 per position but stay under
  # (up to the rounding of the 9-term sums, relative to that bound).
  far = jnp.asarray(50.0 * np.eye(9, dtype=np.float32)[:2])
  for temperature in (1.0, 3.0):
    per_row = [logit_kd(far[i:i + 1], -far[i:i + 1], jnp.ones(1), temperature=temperature,
                        divergence='js')[0] for i in range(2)]
    bound = temperature**2 * math.log(2) * (1 + tolerances.sum_tolerance(2 * 9, 1.0))
    assert all(0 < float(x) <= bound for x in per_row)


def test_unknown_divergence_names_the_choices():
  with pytest.raises(ValueError, match="'forward', 'reverse', 'js'"):
    kd.logit_kd(jnp.zeros((1, 3)), jnp.zeros((1, 3)), jnp.ones(1), temperature=1.0,
                divergence='kl')


@pytest.mark.parametrize('divergence', kd.DIVERGENCES)
def test_padding_rows_with_nan_do_not_count(divergence):
  s, t = normal(8, (4, 10)), normal(9, (4, 10))
  w = jnp.array([1.0, 0.5, 0.0, 0.0])
  clean_sum, clean_count = logit_kd(s, t, w, temperature=2.0, divergence=divergence)
  s_bad, t_bad = np.array(s), np.array(t)
  s_bad[2], s_bad[3], t_bad[2], t_bad[3] = np.nan, np.inf, np.inf, np.nan
  def loss(s):
    return logit_kd(s, t_bad, w, temperature=2.0, divergence=divergence)[0]
  # One compiled program, and the padding rows are replaced before any arithmetic: the same
  # operations on the same values, bit for bit.
  np.testing.assert_array_equal(loss(s_bad), clean_sum)
  assert float(clean_count) == 1.5
  # The gradient stays finite too: padding rows get exactly zero.
  grad = jax.grad(loss)(s_bad)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad[2:]) == 0.0)


@pytest.mark.parametrize('divergence', kd.DIVERGENCES)
def test_masked_vocabulary_entries_give_finite_values_and_gradients(divergence):
  # -inf logits (a masked vocabulary) mean p = 0 there: 0 log 0 must count as 0, not NaN.
  s, t = np.array(normal(10, (3, 6))), np.array(normal(11, (3, 6)))
  s[:, -2:] = t[:, -2:] = -np.inf
  value, grad = jax.value_and_grad(lambda s: logit_kd(
      s, t, jnp.ones(3), temperature=1.5, divergence=divergence)[0])(s)
  assert np.isfinite(value) and float(value) > 0 and np.all(np.isfinite(grad))


def test_bf16_teacher_and_traced_temperature():
  s, t = normal(12, (2, 3, 16)), normal(13, (2, 3, 16)).astype(jnp.bfloat16)
  w = jnp.ones((2, 3))
  loss = jax.jit(lambda s, t, temp: logit_kd(s, t, w, temperature=temp))
  total, count = loss(s, t, jnp.float32(2.0))
  assert total.dtype == jnp.float32 and count.dtype == jnp.float32
  reference, _ = logit_kd(s, t.astype(jnp.float32), w, temperature=2.0)
  # The same float32 values (bf16 widens exactly); a traced temperature is another program
  # (no constant folding of / T): its 16-term sums and 6 positions may round otherwise.
  np.testing.assert_allclose(total, reference, rtol=tolerances.sum_tolerance(2 * 16 + 6, 1.0))


# Top-k (cached teacher) distillation.

def test_topk_kd_with_full_support_equals_forward_kl():
  s, t = normal(14, (3, 4, 12), 2.0), normal(15, (3, 4, 12), 2.0)
  w = jnp.asarray(np.random.default_rng(16).uniform(size=(3, 4)), jnp.float32)
  values, indices = kd.topk(t, 12)
  for temperature in (1.0, 3.0):
    full, full_count = logit_kd(s, t, w, temperature=temperature)
    cached, cached_count = topk_kd(s, values, indices, w, temperature=temperature)
    # The teacher's 12 classes in sorted order: its log-softmax and the KL add them otherwise,
    # and each program sums the 12 positions (weights and losses, positive) its own way.
    np.testing.assert_allclose(cached, full, rtol=tolerances.sum_tolerance(2 * 12 + 12, 1.0))
    np.testing.assert_allclose(cached_count, full_count, rtol=tolerances.sum_tolerance(12, 1.0))


def test_topk_kd_by_hand():
  # k = 2 of V = 4; uniform student: log q = -log 4 everywhere, inside the support or not.
  values, indices = jnp.array([[2.0, 1.0]]), jnp.array([[1, 3]])
  p = np.array([math.e**2, math.e]) / (math.e**2 + math.e)
  expected = float(np.sum(p * (np.log(p) + math.log(4))))
  total, count = topk_kd(jnp.zeros((1, 4)), values, indices, jnp.ones(1), temperature=1.0)
  # About ten float32 roundings (two log-softmaxes, the 2-term KL), of values up to log 4.
  np.testing.assert_allclose(total, expected, atol=10 * tolerances.EPS32 * math.log(4))
  assert float(count) == 1.0
  # A student concentrated on the support scores better than one spreading mass outside it.
  on_support = jnp.array([[-5.0, 2.0, -5.0, 1.0]])
  better, _ = topk_kd(on_support, values, indices, jnp.ones(1), temperature=1.0)
  assert 0 <= float(better) < expected


def test_topk_kd_ignores_entry_order():
  s, t = normal(17, (2, 5, 20)), normal(18, (2, 5, 20))
  values, indices = kd.topk(t, 6)
  order = np.random.default_rng(19).permutation(6)
  w = jnp.ones((2, 5))
  a, _ = topk_kd(s, values, indices, w, temperature=2.0)
  b, _ = topk_kd(s, values[..., order], indices[..., order], w, temperature=2.0)
  # Only the order of the k = 6 entries in the teacher's log-softmax and the KL differs.
  np.testing.assert_allclose(a, b, rtol=tolerances.sum_tolerance(2 * 6, 1.0))


def test_topk_kd_padding_rows_may_hold_garbage():
  s, t = normal(28, (3, 10)), normal(29, (3, 10))
  values, indices = kd.topk(t, 4)
  w = jnp.array([1.0, 1.0, 0.0])
  clean, _ = topk_kd(s, values, indices, w, temperature=2.0)
  bad_values, bad_indices = np.array(values), np.array(indices)
  bad_values[2], bad_indices[2] = np.nan, 10**6  # an unwritten cache row
  def loss(s):
    return topk_kd(s, bad_values, bad_indices, w, temperature=2.0)[0]
  # One compiled program; the garbage row is replaced before any arithmetic: bit for bit.
  np.testing.assert_array_equal(loss(s), clean)
  assert np.all(np.isfinite(jax.grad(loss)(s)))


def test_topk_returns_largest_in_descending_order():
  logits = normal(20, (3, 30)).astype(jnp.bfloat16)
  values, indices = kd.topk(logits, 5)  # copies and widens values: exact
  assert values.dtype == jnp.float32 and indices.dtype == jnp.int32
  assert np.all(np.diff(np.asarray(values), axis=-1) <= 0)
  np.testing.assert_array_equal(
      values, np.take_along_axis(np.asarray(logits, np.float32), np.asarray(indices), -1))
  np.testing.assert_array_equal(values, -np.sort(-np.asarray(logits, np.float32))[:, :5])


# Hidden states and attention maps.

@pytest.mark.parametrize('kind', kd.HIDDEN_KINDS)
def test_hidden_state_loss(kind):
  a, b = normal(21, (2, 5, 8)), normal(22, (2, 5, 8))
  w = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)
  same, count = hidden_state_loss(a, a, w, kind=kind)
  # MSE: exactly 0. Cosine: 1 - (a.a) / (|a| |a|), three 8-term sums and a few roundings of
  # a ratio near 1, for each of the 8 positions.
  assert abs(float(same)) <= 8 * tolerances.sum_tolerance(3 * 8 + 3, 1.0)
  assert float(count) == 8
  assert float(hidden_state_loss(a, b, w, kind=kind)[0]) > 0
  # A zero vector neither breaks the value nor the gradient.
  zero = np.array(a)
  zero[0, 0] = 0.0
  value, grad = jax.value_and_grad(lambda x: hidden_state_loss(x, b, w, kind=kind)[0])(zero)
  assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_projection_learns_through_hidden_state_loss():
  proj = nnx.Linear(in_features=8, out_features=16, rngs=nnx.Rngs(0))
  student, teacher = normal(23, (2, 5, 8)), normal(24, (2, 5, 16))
  w = jnp.ones((2, 5))
  for kind in kd.HIDDEN_KINDS:
    grads = nnx.grad(lambda proj: hidden_state_loss(proj(student), teacher, w, kind=kind)[0])(
        proj)
    kernel = np.asarray(grads.kernel[...])
    assert np.all(np.isfinite(kernel)) and np.any(kernel != 0)


@pytest.mark.parametrize('kind', kd.ATTENTION_KINDS)
def test_attention_loss(kind):
  # Causal maps: keys after the query have probability exactly 0 in both models.
  causal = np.tril(np.ones((6, 6), bool))
  def maps(seed, heads):
    logits = np.where(causal, np.asarray(normal(seed, (2, heads, 6, 6))), -np.inf)
    return jnp.asarray(np_softmax(logits))
  w = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.float32)
  a, b = maps(25, 4), maps(26, 4)
  same, count = attention_loss(a, a, w, kind=kind)
  # Every term is x - x or log x - log x of the same values: exactly 0.
  assert float(same) == 0.0 and float(count) == 10
  value, grad = jax.value_and_grad(lambda x: attention_loss(x, b, w, kind=kind)[0])(a)
  assert float(value) > 0 and np.all(np.isfinite(grad))
  # Two student heads against four teacher heads: compared through their head means.
  student = maps(27, 2)
  assert float(attention_loss(student, b, w, kind=kind)[0]) > 0
  matching = np.broadcast_to(np.mean(np.asarray(b), axis=1, keepdims=True), (2, 2, 6, 6))
  # numpy's and XLA's head means differ by an ulp or so; KL and MSE are second order in that.
  assert abs(float(attention_loss(matching, b, w, kind=kind)[0])) < 1e-6


def test_unknown_kinds_name_the_choices():
  x = jnp.zeros((1, 2, 3))
  with pytest.raises(ValueError, match="'mse', 'cosine'"):
    kd.hidden_state_loss(x, x, jnp.ones((1, 2)), kind='l1')
  with pytest.raises(ValueError, match="'kl', 'mse'"):
    kd.attention_loss(x[None], x[None], jnp.ones((1, 2)), kind='l1')


# Layer maps.

def test_uniform_layer_map():
  assert kd.uniform_layer_map(2, 6) == (3, 6)
  assert kd.uniform_layer_map(3, 12) == (4, 8, 12)
  assert kd.uniform_layer_map(6, 6) == (1, 2, 3, 4, 5, 6)
  for ls, lt in [(1, 1), (4, 6), (5, 7), (3, 24)]:
    blocks = kd.uniform_layer_map(ls, lt)
    assert len(blocks) == ls and blocks[-1] == lt and list(blocks) == sorted(set(blocks))
  for args, name in [((0, 6), 'num_student_layers'), ((2, 0), 'num_teacher_layers'),
                     ((7, 6), 'num_student_layers')]:
    with pytest.raises(ValueError, match=name):
      kd.uniform_layer_map(*args)


def test_parse_layer_map():
  assert kd.parse_layer_map('', 2, 6) == (3, 6)
  assert kd.parse_layer_map('2, 5', 2, 6) == (2, 5)
  for text in ['1,2,3', '0,6', '3,7', 'a,b']:
    with pytest.raises(ValueError, match=r'config\.distill\.layer_map.*2 comma-separated'):
      kd.parse_layer_map(text, 2, 6)


# Schedules.

@pytest.mark.parametrize('start,end', [(0.2, 0.9), (4.0, 1.0)])
@pytest.mark.parametrize('kind', ['linear', 'cosine'])
def test_schedule_endpoints_midpoint_and_monotone(kind, start, end):
  schedule = schedules.make(kind, start, end, num_steps=100)
  for step, value in [(0, start), (100, end), (250, end), (-5, start), (50, (start + end) / 2)]:
    # A handful of float32 operations (a cosine, a blend): 1e-6 is 8 eps32.
    np.testing.assert_allclose(schedule(step), value, rtol=1e-6)
  values = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(0, 101)))
  assert values.dtype == np.float32
  steps = np.diff(values) * np.sign(end - start)
  # Against the direction by rounding at most (a few ulps of the largest value); inside, every
  # step (1e-4 or more, even where the cosine is flattest) is far above that.
  assert np.all(steps >= -4 * tolerances.EPS32 * max(start, end)) and np.all(steps[1:-1] > 0)


def test_constant_schedule_and_errors():
  schedule = schedules.make('constant', 0.5, 0.1, num_steps=10)
  assert float(jax.jit(schedule)(jnp.int32(7))) == 0.5 and float(schedule(1000)) == 0.5
  with pytest.raises(ValueError, match=r"config\.distill\.alpha_schedule='step'; choose from"):
    schedules.make('step', 0.0, 1.0, 10, field='config.distill.alpha_schedule')
  with pytest.raises(ValueError, match='num_steps'):
    schedules.make('linear', 0.0, 1.0, 0)

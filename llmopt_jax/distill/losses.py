"""Distillation losses as (sum, weight) pairs: logits, top-k logits, hidden states, attention.

Every loss returns float32 `(loss_sum, weight_sum)` over weighted positions, like
`llmopt_jax.losses`, so callers divide once after summing over micro-batches and hosts.
`weights` has the shape of the inputs without their last axis (or, for attention maps,
[B, T]); weight 0 marks padding. Teacher inputs go through `stop_gradient`: the teacher is a
fixed target, and a gradient into a cached or frozen teacher would only cost memory.

All arithmetic is in float32 whatever the input dtype: bf16 teacher logits are fine to store
and pass, but a softmax over a large vocabulary in bf16 loses the tail probabilities that a
KL divergence is made of. `temperature` may be traced (it is scheduled over training), so no
code branches on its value.

Axis letters: B batch, T query / token positions, S key positions, N heads, V vocabulary,
K top-k entries, D hidden width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DIVERGENCES = ('forward', 'reverse', 'js')
HIDDEN_KINDS = ('mse', 'cosine')
ATTENTION_KINDS = ('kl', 'mse')

# Floor for student attention probabilities inside a log: log(tiny) is about -87, finite, so
# a zero student probability where the teacher is zero too gives 0 * finite = 0, not NaN.
_TINY = float(jnp.finfo(jnp.float32).tiny)
_EPS = 1e-8  # norm floor for cosine similarity of zero vectors


def _weighted_sum(per_position: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  weights = weights.astype(jnp.float32)
  # `where`, not just the product: a padding row's NaN would survive 0 * NaN in the sum.
  return jnp.sum(jnp.where(weights > 0, per_position * weights, 0.0)), jnp.sum(weights)


def _real_rows(x: jax.Array, weights: jax.Array, fill=0) -> jax.Array:
  """x with padding rows (weight 0 at the leading positions) replaced by `fill`.

  The final `where` in `_weighted_sum` keeps the loss finite; this keeps the *gradient*
  finite too, since backpropagating a zero cotangent through a NaN softmax still gives NaN.
  An uninitialised teacher cache in padding rows is the usual source.
  """
  keep = (weights > 0).reshape(weights.shape + (1,) * (x.ndim - weights.ndim))
  return jnp.where(keep, x, fill)


def _kl(p: jax.Array, log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """KL(p || q) over the last axis, with 0 * log 0 = 0 in value and in gradient.

  The difference is masked before the product (the xlogy trick): masking only the product
  would leave 0 * (-inf) in the backward pass wherever p = 0 because log p = -inf.
  """
  diff = jnp.where(p > 0, log_p - log_q, 0.0)
  return jnp.sum(p * diff, axis=-1)


def logit_kd(student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array, *,
             temperature: float | jax.Array, divergence: str = 'forward'
             ) -> tuple[jax.Array, jax.Array]:
  """Logit distillation (Hinton et al., 2015): T^2 * D(p, q) summed over weighted positions.

  p = softmax(teacher / T), q = softmax(student / T) over the last axis; D is KL(p || q) for
  'forward' (mass-covering, the classic choice), KL(q || p) for 'reverse' (mode-seeking, as in
  MiniLLM, Gu et al., 2024) or Jensen-Shannon for 'js' (symmetric, bounded by log 2). The T^2
  factor keeps gradient magnitudes comparable across temperatures, since d/ds of the KL
  scales as 1 / T.

  Args:
    student_logits: [..., V], e.g. [B, C] or [B, T, V].
    teacher_logits: same shape; any float dtype (bf16 is fine).
    weights: [...] (the leading shape), 0 for padding.
    temperature: python float or traced scalar, > 0.
    divergence: one of DIVERGENCES.

  Returns:
    float32 (loss_sum, weight_sum).
  """
  if divergence not in DIVERGENCES:
    raise ValueError(f'divergence={divergence!r}; choose from {DIVERGENCES}')
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f'student logits {student_logits.shape} and teacher logits '
                     f'{teacher_logits.shape} must have the same shape')
  temperature = jnp.asarray(temperature, jnp.float32)
  teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  student = student_logits.astype(jnp.float32)
  log_p = jax.nn.log_softmax(_real_rows(teacher, weights) / temperature, axis=-1)  # [..., V]
  log_q = jax.nn.log_softmax(_real_rows(student, weights) / temperature, axis=-1)  # [..., V]
  p, q = jnp.exp(log_p), jnp.exp(log_q)
  if divergence == 'forward':
    per_position = _kl(p, log_p, log_q)
  elif divergence == 'reverse':
    per_position = _kl(q, log_q, log_p)
  else:
    # log m = log((p + q) / 2) from the log-probabilities, so tiny p and q do not underflow.
    # Where both are 0 (masked vocabulary) the inputs are swapped for 0: that entry is
    # masked in `_kl` anyway, but logaddexp(-inf, -inf) would still send NaN backwards.
    either = (p > 0) | (q > 0)
    log_m = jnp.logaddexp(jnp.where(either, log_p, 0.0),
                          jnp.where(either, log_q, 0.0)) - math.log(2.0)
    per_position = 0.5 * (_kl(p, log_p, log_m) + _kl(q, log_q, log_m))
  return _weighted_sum(temperature**2 * per_position, weights)


def topk(teacher_logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(float32 values [..., k], int32 indices [..., k]) of the k largest logits, descending.

  What an offline teacher cache stores per position: k values instead of a V-wide row.
  """
  values, indices = jax.lax.top_k(teacher_logits, k)
  return values.astype(jnp.float32), indices.astype(jnp.int32)


def topk_kd(student_logits: jax.Array, teacher_values: jax.Array, teacher_indices: jax.Array,
            weights: jax.Array, *, temperature: float | jax.Array
            ) -> tuple[jax.Array, jax.Array]:
  """Forward KL from a teacher truncated to its top-k logits (an offline / cached teacher).

  The teacher distribution is renormalised over its support: p~ = softmax(values / T) over
  the K entries. The student keeps its full-vocabulary log q = log_softmax(student / T),
  gathered at the teacher's indices and *not* renormalised, so mass the student puts outside
  the teacher's support still lowers log q on the support and is penalised. Per position:
  T^2 * sum_K p~ (log p~ - log q). With K = V this is `logit_kd(..., divergence='forward')`.

  Only the forward direction is defined: reverse KL and JS need the teacher's probability
  wherever the student has mass, i.e. on the whole vocabulary, which the cache no longer has
  (treating the missing entries as 0 would make them infinite).

  Args:
    student_logits: [..., V].
    teacher_values: [..., K] teacher logits at `teacher_indices`.
    teacher_indices: [..., K] int vocabulary ids, in any order.
    weights: [...], 0 for padding.
    temperature: python float or traced scalar, > 0.

  Returns:
    float32 (loss_sum, weight_sum).
  """
  if teacher_values.shape != teacher_indices.shape:
    raise ValueError(f'teacher values {teacher_values.shape} and indices '
                     f'{teacher_indices.shape} must have the same shape')
  temperature = jnp.asarray(temperature, jnp.float32)
  values = jax.lax.stop_gradient(teacher_values).astype(jnp.float32)
  # Padding rows of a cache may hold any ids; id 0 keeps the gather in bounds.
  indices = _real_rows(jax.lax.stop_gradient(teacher_indices), weights)
  log_p = jax.nn.log_softmax(_real_rows(values, weights) / temperature, axis=-1)   # [..., K]
  student = _real_rows(student_logits.astype(jnp.float32), weights)
  log_q_all = jax.nn.log_softmax(student / temperature, axis=-1)                   # [..., V]
  log_q = jnp.take_along_axis(log_q_all, indices, axis=-1)                         # [..., K]
  per_position = _kl(jnp.exp(log_p), log_p, log_q)
  return _weighted_sum(temperature**2 * per_position, weights)


def hidden_state_loss(student_hidden: jax.Array, teacher_hidden: jax.Array, weights: jax.Array,
                      *, kind: str = 'mse') -> tuple[jax.Array, jax.Array]:
  """Per-token distance between hidden states [..., T, D], summed with weights [..., T].

  'mse': mean over D of the squared difference (TinyBERT, Jiao et al., 2020); 'cosine':
  1 - cosine similarity over D (DistilBERT's cosine embedding loss, Sanh et al., 2019),
  indifferent to the scale of the states. A projection from the student's width to the
  teacher's, if any, is applied by the caller, so it is trained through this loss.
  """
  if kind not in HIDDEN_KINDS:
    raise ValueError(f'kind={kind!r}; choose from {HIDDEN_KINDS}')
  if student_hidden.shape != teacher_hidden.shape:
    raise ValueError(f'student hidden {student_hidden.shape} and teacher hidden '
                     f'{teacher_hidden.shape} must have the same shape (project first)')
  teacher = _real_rows(jax.lax.stop_gradient(teacher_hidden).astype(jnp.float32), weights)
  student = _real_rows(student_hidden.astype(jnp.float32), weights)
  if kind == 'mse':
    per_token = jnp.mean(jnp.square(student - teacher), axis=-1)                  # [..., T]
  else:
    # The floor sits under the square root: sqrt'(0) is infinite, so a zero vector would
    # give a NaN gradient if the norm were floored after it.
    def norm(x):
      return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1), _EPS**2))
    dot = jnp.sum(student * teacher, axis=-1)
    per_token = 1.0 - dot / (norm(student) * norm(teacher))                        # [..., T]
  return _weighted_sum(per_token, weights)


def attention_loss(student_probs: jax.Array, teacher_probs: jax.Array, weights: jax.Array,
                   *, kind: str = 'kl') -> tuple[jax.Array, jax.Array]:
  """Distance between attention maps [B, N, T, S], summed over queries with weights [B, T].

  Rows are distributions over keys S (masked keys have probability 0). With equal head
  counts the maps are compared head by head; otherwise each is first averaged over its heads
  ([B, 1, T, S]), since heads of different models have no correspondence. 'kl': KL(teacher
  row || student row) averaged over heads (MiniLM, Wang et al., 2020); 'mse': mean over heads
  and keys of the squared difference (TinyBERT).
  """
  if kind not in ATTENTION_KINDS:
    raise ValueError(f'kind={kind!r}; choose from {ATTENTION_KINDS}')
  s_shape, t_shape = student_probs.shape, teacher_probs.shape
  if len(s_shape) != 4 or s_shape[:1] + s_shape[2:] != t_shape[:1] + t_shape[2:]:
    raise ValueError(f'attention maps must be [B, N, T, S] with equal B, T, S; got student '
                     f'{s_shape} and teacher {t_shape}')
  teacher = jax.lax.stop_gradient(teacher_probs).astype(jnp.float32)
  student = student_probs.astype(jnp.float32)
  if s_shape[1] != t_shape[1]:
    teacher = jnp.mean(teacher, axis=1, keepdims=True)                             # [B, 1, T, S]
    student = jnp.mean(student, axis=1, keepdims=True)
  # Padding queries are masked across every head: weights [B, T] -> [B, 1, T].
  head_weights = weights[:, None, :]
  teacher = _real_rows(teacher, head_weights)
  student = _real_rows(student, head_weights)
  if kind == 'kl':
    log_p = jnp.log(jnp.where(teacher > 0, teacher, 1.0))
    log_q = jnp.log(jnp.maximum(student, _TINY))
    per_head = _kl(teacher, log_p, log_q)                                          # [B, N, T]
  else:
    per_head = jnp.mean(jnp.square(student - teacher), axis=-1)                    # [B, N, T]
  return _weighted_sum(jnp.mean(per_head, axis=1), weights)


def uniform_layer_map(num_student_layers: int, num_teacher_layers: int) -> tuple[int, ...]:
  """1-based teacher block whose output student block m = 1..Ls learns from: round(m Lt / Ls).

  Block m's output is hidden_states[m] when hidden_states[0] is the embedding output. Ties
  round up (4 of 6 -> (2, 3, 5, 6)) in exact integer arithmetic, so the last student block
  always maps to the last teacher block: 2 of 6 -> (3, 6), 3 of 12 -> (4, 8, 12).
  """
  if num_student_layers <= 0:
    raise ValueError(f'num_student_layers={num_student_layers}; must be positive')
  if num_teacher_layers <= 0:
    raise ValueError(f'num_teacher_layers={num_teacher_layers}; must be positive')
  if num_student_layers > num_teacher_layers:
    raise ValueError(f'num_student_layers={num_student_layers} exceeds '
                     f'num_teacher_layers={num_teacher_layers}')
  ls, lt = num_student_layers, num_teacher_layers
  return tuple((2 * m * lt + ls) // (2 * ls) for m in range(1, ls + 1))


def parse_layer_map(text: str, num_student_layers: int, num_teacher_layers: int
                    ) -> tuple[int, ...]:
  """`config.distill.layer_map`: '' for the uniform map, else '3,6' (1-based teacher blocks)."""
  if not text.strip():
    return uniform_layer_map(num_student_layers, num_teacher_layers)
  expected = (f'{num_student_layers} comma-separated teacher blocks in '
              f'[1, {num_teacher_layers}], one per student block')
  try:
    blocks = tuple(int(part) for part in text.split(','))
  except ValueError:
    raise ValueError(f'config.distill.layer_map={text!r}; expected {expected}') from None
  if len(blocks) != num_student_layers or not all(1 <= b <= num_teacher_layers for b in blocks):
    raise ValueError(f'config.distill.layer_map={text!r}; expected {expected}')
  return blocks

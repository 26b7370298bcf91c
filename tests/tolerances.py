"""Tolerances of float32 comparisons, derived from the computation rather than tuned.

Two programs that add the same float32 terms in another order (another instruction set's
vector width, another tiling, a sharded reduction, micro-batches) each round every partial sum
by at most half an ulp, so their results differ by at most eps32 * n * sum|terms| for n terms
(Higham, Accuracy and Stability of Numerical Algorithms, 2002, section 4.2). A test takes the
summed terms' absolute values where it has them, else the largest value it compares as their
stand-in. Along a network the sums of successive layers add their errors, and norms and
residual connections keep every stage near the output's scale, so a forward pass's bound is
eps32 times the number of terms summed along its path, relative to its largest output.

Where a rounding step follows such sums (int8 activations), or a function that is nearly a
sign (Adam's g / (|g| + eps) for a gradient at its own rounding error), one value may land on
the other side of a boundary and move by a whole step: those few are bounded by their count
and by the size of the step, not element by element.
"""

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)


def sum_tolerance(n: int, magnitude):
  """How far two float32 sums of `n` terms may drift apart, `magnitude` being sum|terms| (or
  its stand-in)."""
  return EPS32 * n * magnitude


def forward_terms(cfg, length: int) -> int:
  """Terms summed along the path from a token's embedding to one output of the transformer
  `cfg` on `length` tokens. Per block: two norms, the q/k/v projections and the MLP's first
  matrix (embed_dim each), the scores (head_dim), the softmax and the weighted values (length
  each), the output projection (heads x head_dim), the MLP's second matrix (mlp_dim). Then the
  final norm and the head (embed_dim each)."""
  block = (4 * cfg.embed_dim + cfg.head_dim + 2 * length + cfg.num_heads * cfg.head_dim
           + cfg.mlp_dim)
  return cfg.num_layers * block + 2 * cfg.embed_dim


def gradient_tolerances(grads, terms: int) -> list[float]:
  """Per-leaf bounds on gradients whose `terms` float32 terms were added in two orders: each
  leaf's largest element stands in for the size of its terms. A leaf no larger than the
  rounding error of the model's largest gradient is itself rounding noise (a gradient that is
  0 in exact arithmetic, such as a key bias's, which softmax ignores): that error is its size."""
  largest = [float(np.max(np.abs(g))) for g in grads]
  noise = sum_tolerance(terms, max(largest))
  return [sum_tolerance(terms, max(size, noise)) for size in largest]


def assert_close(actual, desired, tol, err_msg=''):
  """|actual - desired| <= tol elementwise, `tol` an array of per-element bounds (or a number:
  np.testing.assert_allclose takes numbers only)."""
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  excess = np.abs(actual - desired) - tol
  worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.ndim else ()
  bound = np.broadcast_to(tol, excess.shape)[worst]
  assert np.all(excess <= 0), (
      f'{err_msg}: {np.sum(excess > 0)} of {excess.size} beyond their bound; worst at {worst}: '
      f'{actual[worst]:.8g} vs {desired[worst]:.8g}, bound {bound:.3g}')


def assert_adam_params_close(got, want, lr_sum: float, terms: int, err_msg=''):
  """Parameter leaves after Adam steps whose gradients summed `terms` float32 terms in
  different orders. Adam normalises each gradient element by its own size, so an element's
  step moves by lr times the element's relative rounding error, eps32 * terms where its terms
  are no larger than it. An element whose gradient cancels to near its rounding error can
  step either way, by at most lr per step (Kingma & Ba 2015, section 2.1: |step| <= lr when
  1 - b1 <= sqrt(1 - b2)). Such elements are the fraction of a gradient within eps32 * terms
  of zero, about 1e-3 at this code's sizes; each leaf may hold 1% of them."""
  for i, (a, b) in enumerate(zip(got, want, strict=True)):
    assert_close_but_a_few(a, b, lr_sum * sum_tolerance(terms, 1.0), 2 * lr_sum, 0.01,
                           err_msg=f'{err_msg} leaf {i}')


def assert_close_but_a_few(actual, desired, tol, step, max_fraction, err_msg=''):
  """|actual - desired| <= tol but for at most `max_fraction` of the elements, and those
  within `step` (what one value rounding the other way can move them by)."""
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  diff = np.abs(actual - desired)
  beyond = diff > tol
  summary = (f'{err_msg}: {beyond.sum()} of {diff.size} beyond {float(np.max(tol)):.3g}, '
             f'largest {diff.max():.3g} (step {float(np.max(step)):.3g})')
  assert beyond.mean() <= max_fraction, summary
  assert np.all(diff <= step), summary

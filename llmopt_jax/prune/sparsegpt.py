"""SparseGPT: one-shot pruning of a layer with weight reconstruction (Frantar & Alistarh 2023,
"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", arXiv:2301.00774).

A linear layer whose inputs x have second moment H = mean(x x^T) loses, when weight j of one
output is set to zero, w_j^2 / [H^-1]_jj of squared output error over the calibration tokens
if the output's other weights absorb the change (optimal brain surgeon, Hassibi & Stork 1993).
SparseGPT visits the inputs in one fixed order, so that every output shares one sequence of
inverse Hessians: with U the upper Cholesky factor of H^-1 (H^-1 = U^T U), row j of U is the
first row of (H restricted to the inputs j.., those not yet visited)^-1 divided by the square
root of its first element. Visiting input j is then
    err = (w_j - pruned w_j) / U_jj,    w_{j..} -= err * U_{j, j..}
which zeroes w_j where it is pruned and moves only weights not yet visited.

Inputs go in blocks (Algorithm 1): the mask of a block is chosen when the block starts, from
the weights as the earlier blocks left them (adaptive mask selection), keeping per output the
weights of largest w^2 / U_jj^2; the columns of the block are then visited one by one, and
their errors reach the later blocks as one matrix product (GPTQ's lazy batch updates). N:M
sparsity chooses its mask per group of M inputs as the group starts; the block only batches.

Counts are exact: a block prunes round(s * end) - round(s * start) weights of every output, so
each output ends with round(s * I) pruned; the weights are ranked (argsort), not thresholded,
so ties cannot change a count.

Axis letters: O outputs, I inputs (padded to whole blocks), B inputs of one block, N blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def prune(w: jax.Array, hessian: jax.Array, *, sparsity: float = 0.0, n: int = 0, m: int = 0,
          block_size: int = 128, damp: float = 0.01) -> tuple[jax.Array, jax.Array]:
  """(new weights, keep mask) of one layer, float32 and bool, both [I, O].

  w: [I, O] kernel (inputs first). hessian: [I, I] mean of x x^T over calibration tokens.
  Either `sparsity` in [0, 1) (unstructured: every output keeps I - round(sparsity * I)
  weights) or n:m (keep n of every m consecutive inputs of each output, as 2:4). The new
  weights are exactly zero where the mask is False; inputs whose Hessian diagonal is 0 (never
  active) get zero weights too. `damp`, relative to the mean of diag H, keeps H invertible.
  """
  _check(w, hessian, sparsity, n, m, block_size, damp)
  inputs = w.shape[0]
  if m:
    # The mask is chosen per group of m, so the block only batches updates: whole groups.
    block = min(max(m, block_size - block_size % m), inputs)
    starts = range(0, inputs, block)
    group, counts = m, [m - n for _ in starts]
  else:
    block = group = min(block_size, inputs)
    starts = range(0, inputs, block)
    counts = [round(sparsity * min(s + block, inputs)) - round(sparsity * s) for s in starts]
  return _sparsegpt(jnp.asarray(w, jnp.float32), jnp.asarray(hessian, jnp.float32),
                    jnp.asarray(counts, jnp.int32), jnp.float32(damp), block=block, group=group)


def layer_error(w_new: jax.Array, w: jax.Array, x: jax.Array) -> float:
  """||x w_new - x w||_F^2 / ||x w||_F^2: the layer's relative squared output error on the
  tokens x [T, I]. The difference is taken on the weights, so kept weights cancel exactly."""
  x = jnp.asarray(x, jnp.float32)
  delta = jnp.einsum('TI,IO->TO', x, jnp.asarray(w_new, jnp.float32) - w)
  out = jnp.einsum('TI,IO->TO', x, jnp.asarray(w, jnp.float32))
  return float(jnp.sum(jnp.square(delta)) / jnp.sum(jnp.square(out)))


def _check(w, hessian, sparsity, n, m, block_size, damp) -> None:
  """One-line errors naming the argument, before any work."""
  if w.ndim != 2:
    raise ValueError(f'w shape {tuple(w.shape)}; must be 2-D [I, O]')
  inputs = w.shape[0]
  if tuple(hessian.shape) != (inputs, inputs):
    raise ValueError(f'hessian shape {tuple(hessian.shape)}; must be [I, I] = '
                     f'{(inputs, inputs)} for w of shape {tuple(w.shape)}')
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f'sparsity={sparsity}; must lie in [0, 1)')
  if n or m:
    if not 0 < n <= m:
      raise ValueError(f'n:m={n}:{m}; need 0 < n <= m')
    if sparsity:
      raise ValueError(f'sparsity={sparsity} and n:m={n}:{m}; give one of them')
    if inputs % m:
      raise ValueError(f'I={inputs} is not a multiple of m={m}')
  if block_size < 1:
    raise ValueError(f'block_size={block_size}; must be positive')
  if not damp >= 0.0:
    raise ValueError(f'damp={damp}; must be >= 0')


def _inverse_cholesky(hessian: jax.Array, dead: jax.Array, damp: jax.Array) -> jax.Array:
  """U upper triangular with U^T U = H^-1, H damped by damp * mean(diag H) and with the dead
  inputs' diagonal set to 1 (their rows and columns are zero, so H alone is singular).

  With J the order reversal and J H J = L L^T (Cholesky), H^-1 = (J L^-1 J)^T (J L^-1 J) and
  J L^-1 J is upper triangular with a positive diagonal: U, from one factorization and one
  triangular inverse, never forming H^-1 (a third of the work, and more accurate)."""
  eye = jnp.eye(hessian.shape[0], dtype=jnp.float32)
  h = hessian + jnp.diag(dead.astype(jnp.float32))
  h = h + damp * jnp.mean(jnp.diag(h)) * eye
  lower = jnp.linalg.cholesky(h[::-1, ::-1])
  return jax.scipy.linalg.solve_triangular(lower, eye, lower=True)[::-1, ::-1]


def _prune_lowest(score: jax.Array, count: jax.Array) -> jax.Array:
  """Keep mask [O, G]: False on the `count` lowest scores of each row, ties by position."""
  rank = jnp.argsort(jnp.argsort(score, axis=1), axis=1)
  return rank >= count


@functools.partial(jax.jit, static_argnames=('block', 'group'))
def _sparsegpt(w, hessian, counts, damp, *, block: int, group: int):
  """prune() past its checks; counts [N]: how many weights of every output each group of a
  block prunes."""
  inputs, outputs = w.shape
  pad = -inputs % block
  dead = jnp.diag(hessian) == 0
  u = _inverse_cholesky(hessian, dead, damp)
  # Padding inputs look dead (identity rows of U, zero weights) and are never pruned.
  valid = jnp.arange(inputs + pad) < inputs
  u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag((~valid).astype(jnp.float32))  # [I, I]
  wt = jnp.pad(jnp.where(dead[:, None], 0.0, w).T, ((0, 0), (0, pad)))          # [O, I]
  score_cap = jnp.where(valid, 0.0, jnp.inf)

  def one_block(wt, xs):
    start, rows, count = xs                                                   # rows [B, I]
    wb = jax.lax.dynamic_slice_in_dim(wt, start, block, axis=1)               # [O, B]
    ub = jax.lax.dynamic_slice_in_dim(rows, start, block, axis=1)             # [B, B]
    cap = jax.lax.dynamic_slice_in_dim(score_cap, start, block)
    wb, err, keep = _visit_block(wb, ub, cap, count, group)
    later = jnp.where(jnp.arange(inputs + pad) >= start + block, rows, 0.0)
    wt = jax.lax.dynamic_update_slice_in_dim(wt, wb, start, axis=1)
    return wt - jnp.einsum('OB,BI->OI', err, later), keep

  starts = jnp.arange(0, inputs + pad, block)
  rows = u.reshape(-1, block, inputs + pad)                                   # [N, B, I]
  wt, keep = jax.lax.scan(one_block, wt, (starts, rows, counts))
  keep = keep.transpose(1, 0, 2).reshape(outputs, -1)[:, :inputs].T           # [I, O]
  return jnp.where(keep, wt[:, :inputs].T, 0.0), keep


def _visit_block(wb, ub, cap, count, group: int):
  """One block: (weights after it, errors err [O, B] to pass on, keep mask [O, B]).

  Each group of `group` columns (the whole block when unstructured) chooses its mask from the
  weights as the group starts, then its columns are visited in order. The subtraction also
  reaches column j itself, leaving w_j - w_j = 0 where pruned, and U is upper triangular,
  so columns already visited stay as they are.
  """
  d = jnp.diag(ub)

  def one_group(g, carry):
    wb, err, keep = carry
    first = g * group
    wg = jax.lax.dynamic_slice_in_dim(wb, first, group, axis=1)
    dg = jax.lax.dynamic_slice_in_dim(d, first, group)
    cg = jax.lax.dynamic_slice_in_dim(cap, first, group)
    keep_g = _prune_lowest(jnp.square(wg / dg) + cg, count)
    keep = jax.lax.dynamic_update_slice_in_dim(keep, keep_g, first, axis=1)

    def column(t, carry):
      wb, err = carry
      j = first + t
      e = jnp.where(keep[:, j], 0.0, wb[:, j]) / ub[j, j]                    # [O]
      return wb - jnp.einsum('O,B->OB', e, ub[j]), err.at[:, j].set(e)

    wb, err = jax.lax.fori_loop(0, group, column, (wb, err))
    return wb, err, keep

  init = (wb, jnp.zeros_like(wb), jnp.ones(wb.shape, bool))
  return jax.lax.fori_loop(0, wb.shape[1] // group, one_group, init)

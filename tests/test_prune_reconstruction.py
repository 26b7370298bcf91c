"""SparseGPT (llmopt_jax.prune.sparsegpt): exact per-output counts, N:M groups, parity with a
float64 reference of the sequential optimal-brain-surgeon updates, the ordering SparseGPT <
Wanda < magnitude on inputs with outlier channels, and argument errors.

Data are drawn with numpy (no compilation); each layer shape and block compiles once, and the
pruned results the headline tests share are cached.
"""

import functools

import numpy as np
import pytest
import tolerances

from llmopt_jax.prune import sparsegpt

SPECS = {'50%': {'sparsity': 0.5}, '2:4': {'n': 2, 'm': 4}}


def hessian(x: np.ndarray) -> np.ndarray:
  return (x.T @ x / len(x)).astype(np.float32)


@functools.cache
def calibration(seed: int, outliers: bool = True):
  """(x [2048, 128], w [128, 64]). Channels share a rank-8 component, as a real layer's inputs
  do: with independent channels H is nearly diagonal, SparseGPT's score is Wanda's squared,
  and reconstruction has only sampling noise to work with. Four channels are scaled x20, the
  outliers that make Wanda's input norms matter and mislead magnitude pruning."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2048, 128)) + 0.5 * rng.standard_normal((2048, 8)) @ (
      rng.standard_normal((8, 128)))
  if outliers:
    x[:, rng.choice(128, 4, replace=False)] *= 20
  return x.astype(np.float32), rng.standard_normal((128, 64)).astype(np.float32)


@functools.cache
def pruned(seed: int, spec: str):
  x, w = calibration(seed)
  w_new, keep = sparsegpt.prune(w, hessian(x), **SPECS[spec])
  return np.asarray(w_new), np.asarray(keep)


def keep_highest(score: np.ndarray, sparsity: float = 0.0, n: int = 0, m: int = 0):
  """Keep mask [I, O] dropping, per output column, the round(sparsity * I) lowest scores, or
  the m - n lowest of every m consecutive inputs."""
  inputs, outputs = score.shape
  if m:
    groups = score.reshape(inputs // m, m, outputs)
    rank = np.argsort(np.argsort(groups, axis=1, kind='stable'), axis=1, kind='stable')
    return (rank >= m - n).reshape(inputs, outputs)
  rank = np.argsort(np.argsort(score, axis=0, kind='stable'), axis=0, kind='stable')
  return rank >= round(sparsity * inputs)


def magnitude(w, x, **spec):
  return w * keep_highest(np.abs(w), **spec)


def wanda(w, x, **spec):
  """Wanda (Sun et al. 2023): |w_ij| times the input channel's norm over the tokens."""
  return w * keep_highest(np.abs(w) * np.linalg.norm(x, axis=0)[:, None], **spec)


def obs_reference(w, h, keep, damp=0.01):
  """The weights SparseGPT's updates give for the mask `keep`, in float64 and without
  Cholesky factors or blocks: visit inputs in order, prune with the optimal brain surgeon
  update from the current inverse Hessian (Hassibi & Stork 1993), then remove the input from
  it, whether pruned or kept."""
  h = h.astype(np.float64)
  dead = np.diag(h) == 0
  h = h + np.diag(dead.astype(np.float64))
  h_inv = np.linalg.inv(h + damp * np.mean(np.diag(h)) * np.eye(len(h)))
  wt = np.where(dead[:, None], 0.0, w).T.astype(np.float64)                 # [O, I]
  for j in range(len(h)):
    err = np.where(keep[j], 0.0, wt[:, j]) / h_inv[j, j]
    wt[:, j:] -= np.outer(err, h_inv[j, j:])
    h_inv = h_inv - np.outer(h_inv[:, j], h_inv[j]) / h_inv[j, j]
  return np.where(keep, wt.T, 0.0)


@pytest.mark.parametrize('inputs,block', [(96, 32), (100, 64)])
def test_unstructured_counts_are_exact(inputs, block):
  """Every output prunes exactly round(s * I), also when I is not a multiple of the block;
  integer weights make ties in the first block, which ranking must not let change a count."""
  rng = np.random.default_rng(inputs)
  x = rng.standard_normal((256, inputs)).astype(np.float32)
  w = rng.integers(-2, 3, (inputs, 24)).astype(np.float32)
  for sparsity in (0.3, 0.5, 0.7):
    w_new, keep = map(np.asarray, sparsegpt.prune(w, hessian(x), sparsity=sparsity,
                                                  block_size=block))
    np.testing.assert_array_equal(np.sum(~keep, axis=0), round(sparsity * inputs),
                                  err_msg=f'sparsity={sparsity}')
    assert np.all(w_new[~keep] == 0.0), f'sparsity={sparsity}'


@pytest.mark.parametrize('n,m', [(2, 4), (4, 8)])
def test_n_m_groups(n, m):
  x, w = calibration(0)
  w_new, keep = map(np.asarray, sparsegpt.prune(w, hessian(x), n=n, m=m))
  np.testing.assert_array_equal(np.sum(keep.reshape(-1, m, w.shape[1]), axis=1), n)
  assert np.all(w_new[~keep] == 0.0)


@pytest.mark.parametrize('spec,block', [('50%', 32), ('2:4', 32), ('50%', 128)])
def test_matches_float64_reference(spec, block):
  """The Cholesky-factor form, blocks and lazy updates give the weights of the plain
  sequential updates, and a dead input (x always 0) comes back as zeros. Bound: a float32
  Cholesky factor and a triangular inverse are each exact for an H perturbed by about
  eps32 * I relative (Higham 2002, chapters 8 and 10); the weights, solutions of
  systems in H, move by cond(H) times that, relative to their size."""
  x, w = calibration(3, outliers=False)
  x = x.copy()  # the cached draw stays as it is
  x[:, 5] = 0.0
  h = hessian(x)
  w_new, keep = map(np.asarray, sparsegpt.prune(w, h, block_size=block, **SPECS[spec]))
  want = obs_reference(w, h, keep)
  assert np.all(w_new[5] == 0.0)
  damped = h + np.diag(np.diag(h) == 0) + 0.01 * np.mean(np.diag(h)) * np.eye(len(h))
  scale = np.linalg.cond(damped) * np.max(np.abs(want))
  tolerances.assert_close(w_new, want, tolerances.sum_tolerance(2 * len(h), scale),
                          err_msg=spec)


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('spec', SPECS)
def test_sparsegpt_beats_wanda_beats_magnitude(seed, spec):
  x, w = calibration(seed)
  errors = {name: sparsegpt.layer_error(w_new, w, x) for name, w_new in [
      ('sparsegpt', pruned(seed, spec)[0]), ('wanda', wanda(w, x, **SPECS[spec])),
      ('magnitude', magnitude(w, x, **SPECS[spec]))]}
  assert errors['sparsegpt'] < errors['wanda'] < errors['magnitude'], errors


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('spec', SPECS)
def test_reconstruction_beats_masking(seed, spec):
  """Same mask, with and without the updates of the kept weights: the updates do the work."""
  x, w = calibration(seed)
  w_new, keep = pruned(seed, spec)
  assert sparsegpt.layer_error(w_new, w, x) < sparsegpt.layer_error(w * keep, w, x)


def test_no_sparsity_is_identity():
  """Nothing pruned: every error term is exactly 0, so every update subtracts 0 * U and the
  weights come back bit for bit (0 ulps is the bound the computation gives)."""
  x, w = calibration(0)
  w_new, keep = map(np.asarray, sparsegpt.prune(w, hessian(x), sparsity=0.0))
  assert keep.all()
  np.testing.assert_array_equal(w_new, w)


@pytest.mark.parametrize('inputs,kwargs,name', [
    (32, {'sparsity': 1.2}, 'sparsity=1.2'),
    (32, {'sparsity': -0.1}, 'sparsity=-0.1'),
    (32, {'n': 5, 'm': 4}, 'n:m=5:4'),
    (32, {'n': 2}, 'n:m=2:0'),
    (32, {'sparsity': 0.5, 'n': 2, 'm': 4}, 'sparsity=0.5'),
    (30, {'n': 2, 'm': 4}, 'I=30'),
    (32, {'block_size': 0}, 'block_size=0'),
    (32, {'damp': -1.0}, 'damp=-1.0'),
])
def test_bad_arguments(inputs, kwargs, name):
  w = np.zeros((inputs, 8), np.float32)
  with pytest.raises(ValueError, match=name):
    sparsegpt.prune(w, np.eye(inputs, dtype=np.float32), **kwargs)


def test_hessian_shape_mismatch():
  with pytest.raises(ValueError, match='hessian shape'):
    sparsegpt.prune(np.zeros((32, 8), np.float32), np.eye(16, dtype=np.float32), sparsity=0.5)

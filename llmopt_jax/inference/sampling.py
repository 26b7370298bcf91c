"""Choosing the next token: greedy, temperature, top-k and top-p, per row, with log-probs.

Every row of a batch carries its own settings as arrays ([B] temperature, top-k, top-p,
seed), so requests with different settings share one compiled program and a batch of new
requests never recompiles. A row's random key is `fold_in(key(seed), n)` for its n-th new
token: the same request gives the same text whichever batch, slot or engine serves it.

The reported log-probability is the model's own, log_softmax of the raw logits at the chosen
token, whatever the temperature or truncation that chose it (the quantity a scorer or an
advisor ranking completions wants; OpenAI's `logprobs` are the same).
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request is decoded; the defaults are greedy."""

  max_new_tokens: int = 64
  temperature: float = 0.0  # 0: greedy (argmax); otherwise logits / temperature are sampled
  top_k: int = 0            # keep the k most likely tokens; 0: all
  top_p: float = 1.0        # keep the smallest set of tokens holding this much mass (nucleus)
  seed: int = 0
  stop: tuple[str, ...] = ()  # the completion ends before the first of these strings

  def __post_init__(self):
    object.__setattr__(self, 'stop', tuple(self.stop))
    _check(self, 'max_new_tokens', isinstance(self.max_new_tokens, numbers.Integral) and
           not isinstance(self.max_new_tokens, bool) and self.max_new_tokens >= 1, 'an int >= 1')
    _check(self, 'temperature', isinstance(self.temperature, numbers.Real) and
           0.0 <= self.temperature < float('inf'), 'a number >= 0')
    _check(self, 'top_k', isinstance(self.top_k, numbers.Integral) and
           not isinstance(self.top_k, bool) and self.top_k >= 0, 'an int >= 0')
    _check(self, 'top_p', isinstance(self.top_p, numbers.Real) and 0.0 < self.top_p <= 1.0,
           'a number in (0, 1]')
    _check(self, 'seed', isinstance(self.seed, numbers.Integral) and
           not isinstance(self.seed, bool) and 0 <= self.seed < 2**31, 'an int in [0, 2^31)')
    _check(self, 'stop', all(isinstance(s, str) and s for s in self.stop),
           'a list of non-empty strings')


def _check(params: SamplingParams, field: str, ok: bool, expected: str) -> None:
  if not ok:
    raise ValueError(f'sampling.{field} must be {expected}, got {getattr(params, field)!r}')


def row_settings(params: list[SamplingParams], batch: int) -> dict[str, np.ndarray]:
  """The per-row arrays `sample` reads (temperature, top_k, top_p, seed: [batch] each) for
  `params`; rows past len(params) (batch padding) decode greedily."""
  rows = list(params) + [SamplingParams()] * (batch - len(params))
  return dict(
      temperature=np.array([p.temperature for p in rows], np.float32),
      top_k=np.array([p.top_k for p in rows], np.int32),
      top_p=np.array([p.top_p for p in rows], np.float32),
      seed=np.array([p.seed for p in rows], np.uint32))


def sample(logits: jax.Array, settings: dict[str, jax.Array], index: jax.Array
           ) -> tuple[jax.Array, jax.Array]:
  """(token [B] int32, its log-probability [B] float32) from `logits` [B,V] float32.

  `index` [B] counts the row's new tokens so far (it picks the row's random key). The sort
  that top-k and top-p need runs only when some row asks for them.
  """
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  any_random = jnp.any(settings['temperature'] > 0)
  token = jax.lax.cond(any_random, _sample_rows, lambda *_: greedy, logits, settings, index)
  token = jnp.where(settings['temperature'] > 0, token, greedy)
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  return token, jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]


def _sample_rows(logits: jax.Array, settings: dict[str, jax.Array], index: jax.Array
                 ) -> jax.Array:
  temperature = jnp.maximum(settings['temperature'], 1e-6)[:, None]
  scaled = logits / temperature
  needs_sort = jnp.any((settings['top_k'] > 0) | (settings['top_p'] < 1.0))
  scaled = jax.lax.cond(needs_sort, _truncate, lambda x, *_: x, scaled, settings['top_k'],
                        settings['top_p'])
  keys = jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.key(seed), n))(
      settings['seed'], index)
  return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)


def _truncate(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """`scaled` [B,V] with tokens outside each row's top-k and top-p set to -inf.

  A token survives top-p when the mass of the tokens ranked strictly above it is below p, so
  the most likely token always survives and the kept set is the smallest reaching p. Ties at
  a threshold are all kept (a threshold on values, not ranks).
  """
  vocab = scaled.shape[-1]
  ranked = -jnp.sort(-scaled, axis=-1)  # descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)  # [B, 1]
  ranked = jnp.where(ranked >= kth, ranked, -jnp.inf)
  probs = jax.nn.softmax(ranked, axis=-1)
  mass_above = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_above < top_p[:, None]
  last_kept = jnp.sum(keep, axis=-1) - 1  # keep is a prefix of the ranking
  # Past the k-th, `ranked` is -inf: the top-k threshold then decides alone.
  threshold = jnp.maximum(kth, jnp.take_along_axis(ranked, last_kept[:, None], axis=-1))
  return jnp.where(scaled >= threshold, scaled, -jnp.inf)

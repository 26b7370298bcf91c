"""The pure, jitted half of generation: prefill a batch of prompts, then decode in a loop.

`Decoding` holds everything a batch of rows needs between steps, on device: the KV cache, each
row's last token and its position, how many tokens it has made and may make, whether it is
done, its output so far and its sampling settings. `prefill` builds one from left-padded
prompts; `run` advances it inside one `lax.while_loop` until every row is done (static
batching) or until some row finishes (continuous batching: the host then refills that row
with `insert`). Shapes are fixed by (rows, prompt bucket, cache slots, output slots), so the
programs compile once per bucket and are reused for every batch after.

Left padding: a prompt of n tokens in a bucket of P sits in slots P - n .. P - 1 with
positions 0 .. n - 1; its padding slots are never attended to, so a row's tokens do not depend
on how much padding the batch needed (the parity tests against transformers check this).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llmopt_jax.inference import sampling
from llmopt_jax.models import kv_cache


class Decoding(NamedTuple):
  cache: kv_cache.KVCache
  last: jax.Array       # [B] int32, the latest token, input to the next step
  position: jax.Array   # [B] int32, its position id
  count: jax.Array      # [B] int32, tokens generated so far
  limit: jax.Array      # [B] int32, max new tokens (0: an empty padding row)
  done: jax.Array       # [B] bool
  tokens: jax.Array     # [B, N] int32, the output so far (count[b] of them are real)
  logprobs: jax.Array   # [B, N] float32, the model's log-probability of each
  settings: dict        # per-row sampling arrays (sampling.RowSettings)


def prefill(graphdef: nnx.GraphDef, params: nnx.State, prompt: jax.Array,
            prompt_mask: jax.Array, limit: jax.Array, settings: dict, eos: jax.Array, *,
            cache_length: int, output_length: int) -> Decoding:
  """Runs the left-padded `prompt` [B,P] (`prompt_mask` 1 on real tokens) through a fresh
  cache of `cache_length` slots and samples each row's first new token."""
  model = nnx.merge(graphdef, params)
  batch = prompt.shape[0]
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
  cache = kv_cache.empty(model.config, batch, cache_length)
  logits, cache = model.decode(prompt, positions=positions, token_mask=prompt_mask, cache=cache)
  zeros = jnp.zeros((batch,), jnp.int32)
  token, logprob = sampling.sample(logits, settings, zeros)
  tokens = jnp.zeros((batch, output_length), jnp.int32).at[:, 0].set(token)
  logprobs = jnp.zeros((batch, output_length), jnp.float32).at[:, 0].set(logprob)
  count = jnp.where(limit > 0, 1, 0).astype(jnp.int32)
  done = (count >= limit) | jnp.isin(token, eos)
  return Decoding(cache, token, jnp.sum(prompt_mask, axis=1).astype(jnp.int32), count,
                  limit.astype(jnp.int32), done, tokens, logprobs, settings)


def step(model: nnx.Module, state: Decoding, eos: jax.Array) -> Decoding:
  """One new token for every row; rows already done compute but record nothing."""
  ones = jnp.ones_like(state.last)[:, None]
  logits, cache = model.decode(state.last[:, None], positions=state.position[:, None],
                               token_mask=ones, cache=state.cache)
  token, logprob = sampling.sample(logits, state.settings, state.count)
  live = ~state.done
  rows = jnp.arange(token.shape[0])
  slot = jnp.minimum(state.count, state.tokens.shape[1] - 1)
  tokens = state.tokens.at[rows, slot].set(jnp.where(live, token, state.tokens[rows, slot]))
  logprobs = state.logprobs.at[rows, slot].set(
      jnp.where(live, logprob, state.logprobs[rows, slot]))
  count = state.count + live
  done = state.done | (live & ((count >= state.limit) | jnp.isin(token, eos)))
  return state._replace(cache=cache, last=token, position=state.position + 1, count=count,
                        done=done, tokens=tokens, logprobs=logprobs)


def run(graphdef: nnx.GraphDef, params: nnx.State, state: Decoding, eos: jax.Array,
        max_steps: jax.Array, *, until_any_done: bool) -> Decoding:
  """Steps until every row is done, `max_steps` steps were taken, or (`until_any_done`) a row
  that was running at the start has finished."""
  model = nnx.merge(graphdef, params)
  running_at_start = ~state.done

  def going(carry):
    n, s = carry
    more = (n < max_steps) & ~jnp.all(s.done)
    return more & ~jnp.any(s.done & running_at_start) if until_any_done else more

  def body(carry):
    n, s = carry
    return n + 1, step(model, s, eos)

  return jax.lax.while_loop(going, body, (jnp.int32(0), state))[1]


def insert(state: Decoding, row: Decoding, slot: jax.Array) -> Decoding:
  """`state` with row `slot` replaced by the single row of `row` (a prefill of one prompt
  into a cache of the same number of slots)."""
  return jax.tree.map(lambda whole, one: whole.at[slot].set(one[0]), state, row)

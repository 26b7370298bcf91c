"""The key/value cache of a decoder: what generation keeps so each new token costs one step.

Every layer's keys and values for the tokens seen so far sit in fixed-size buffers of S slots
per row. A forward pass over T new tokens (`Transformer.decode`) writes their keys and values
at slots cursor .. cursor + T - 1 of each row and attends to every valid slot at or before its
own. Rows keep their own cursor, so one batch can hold requests at different stages (the
engine's continuous batching refills a finished row with a new prompt while the others go on).

Slots, not positions, order the keys: a left-padded prompt occupies the last slots of its
prefill, its padding slots are marked invalid, and the position ids (RoPE angles, learned
position rows) are passed separately. Within a row, slot distance equals position distance
for real tokens, which is what a sliding window needs.

Buffers are laid out [B, K, S, H] (`LAYOUT`): the attention contractions then read each
head's slots contiguously, where [B, S, K, H] made XLA transpose the whole cache of every
layer at every decode step (measured by experiments/bench_generate.py: ~4x slower steps).

Axis letters: B batch   S slots   K key/value heads   H head dim
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llmopt_jax.models.config import TransformerConfig

LAYOUT = 'BKSH'


class KVCache(NamedTuple):
  """A pytree: jit, donation and `jax.tree` see through it."""
  keys: tuple[jax.Array, ...]    # per layer [B, K, S, H], the compute dtype
  values: tuple[jax.Array, ...]  # per layer [B, K, S, H]
  valid: jax.Array               # [B, S] bool: the slot holds a real (not padding) token
  cursor: jax.Array              # [B] int32: the next slot each row writes

  @property
  def length(self) -> int:
    return self.valid.shape[1]


def empty(config: TransformerConfig, batch: int, length: int) -> KVCache:
  """A cache of `length` slots per row for `batch` rows, nothing valid, cursors at 0."""
  shape = (batch, config.num_kv_heads, length, config.head_dim)
  # Distinct buffers (not one zeros array shared), so the cache can be donated to jit.
  def buffers():
    return tuple(jnp.zeros(shape, config.dtype) for _ in range(config.num_layers))
  return KVCache(buffers(), buffers(), jnp.zeros((batch, length), jnp.bool_),
                 jnp.zeros((batch,), jnp.int32))


def write(buffer: jax.Array, new: jax.Array, cursor: jax.Array) -> jax.Array:
  """`buffer` with `new` written at slots cursor[b] .. + T - 1 of each row: a cache buffer
  [B, K, S, H] and new keys or values as projected, [B, T, K, H]; or the validity mask
  [B, S] and new flags [B, T].

  Per row, so rows at different cursors are written in one op; a write running past the end
  is clamped by `dynamic_update_slice` (the engine sizes caches so it never happens)."""
  if buffer.ndim == 4:
    new = jnp.swapaxes(new, 1, 2)  # [B, K, T, H]: T is small (1 when decoding)
  axis = 1 if buffer.ndim == 4 else 0

  def one_row(row, update, start):
    return jax.lax.dynamic_update_slice_in_dim(row, update.astype(row.dtype), start, axis=axis)
  return jax.vmap(one_row)(buffer, new, cursor)


def visible(valid: jax.Array, cursor: jax.Array, num_new: int,
            sliding_window: int = 0) -> jax.Array:
  """Which slots [B, T, S] each of the `num_new` tokens just written at `cursor` may attend to:
  valid ones at or before its own slot, and within the last `sliding_window` slots if set."""
  query_slot = cursor[:, None] + jnp.arange(num_new)[None, :]  # [B, T]
  key_slot = jnp.arange(valid.shape[1])  # [S]
  mask = valid[:, None, :] & (key_slot[None, None, :] <= query_slot[:, :, None])
  if sliding_window:
    mask = mask & (key_slot[None, None, :] > query_slot[:, :, None] - sliding_window)
  return mask

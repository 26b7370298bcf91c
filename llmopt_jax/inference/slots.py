"""Continuous batching: a fixed set of decode slots, each refilled as soon as its row ends.

The slots are the rows of one `decoding.Decoding` whose cache has room for the longest prompt
bucket plus the longest output. Admitting a request prefills it alone (one row, its own prompt
bucket) and copies that row into a free slot; `advance` then decodes all slots together until
one of the running rows finishes (or a step budget runs out, so a server can admit requests
that arrived meanwhile), and hands back the finished rows. The host loop around it, the
`Engine` for a list of prompts or the server for a request stream, decides who waits.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import jax
import jax.numpy as jnp
import numpy as np

from llmopt_jax.inference import decoding
from llmopt_jax.inference.sampling import SamplingParams, row_settings
from llmopt_jax.models import kv_cache


def idle(config, rows: int, cache_length: int, output_length: int) -> decoding.Decoding:
  """A batch of `rows` empty slots (all done, nothing valid in the cache)."""
  def zeros():  # a buffer per field: the state is donated to the decode loop
    return jnp.zeros((rows,), jnp.int32)
  settings = {k: jnp.asarray(v) for k, v in row_settings([], rows).items()}
  return decoding.Decoding(
      kv_cache.empty(config, rows, cache_length), zeros(), zeros(), zeros(), zeros(),
      jnp.ones((rows,), jnp.bool_), jnp.zeros((rows, output_length), jnp.int32),
      jnp.zeros((rows, output_length), jnp.float32), settings)


class Slots:
  """`engine.max_batch` slots for prompts up to `prompt_length` tokens (a bucket) and
  outputs up to `output_length` tokens."""

  def __init__(self, engine, *, prompt_length: int, output_length: int):
    self.engine = engine
    self.prompt_length, self.output_length = prompt_length, output_length
    self.cache_length = prompt_length + output_length
    rows = engine.max_batch
    self.state = idle(engine.config, rows, self.cache_length, output_length)
    self.owners: list[Hashable | None] = [None] * rows

  @property
  def free(self) -> bool:
    return None in self.owners

  @property
  def busy(self) -> bool:
    return any(owner is not None for owner in self.owners)

  def admit(self, owner: Hashable, prompt: np.ndarray, params: SamplingParams) -> None:
    """Prefills `prompt` into a free slot, to be reported under `owner` when it ends."""
    if len(prompt) > self.prompt_length or params.max_new_tokens > self.output_length:
      raise ValueError(f'request too large for these slots: prompt {len(prompt)} tokens '
                       f'(at most {self.prompt_length}), max_new_tokens '
                       f'{params.max_new_tokens} (at most {self.output_length})')
    slot = self.owners.index(None)
    row = self.engine.prefill([prompt], [params], rows=1, cache_length=self.cache_length,
                              output_length=self.output_length)
    self.state = self.engine._insert(self.state, row, jnp.int32(slot))
    self.owners[slot] = owner
    self.engine.stats['admitted'] += 1

  def advance(self, max_steps: int,
              should_stop: Callable[[Hashable, np.ndarray], bool] | None = None) -> dict:
    """Decodes until a running row ends or `max_steps` steps pass; returns {owner:
    Generated} of the rows that ended, whose slots are free again. `should_stop(owner,
    tokens)` may end a row early (a stop string in its text)."""
    running = sum(owner is not None for owner in self.owners)
    self.engine.stats['max_rows'] = max(self.engine.stats['max_rows'], running)
    self.state = self.engine.run(self.state, max_steps, until_any_done=True)
    done, count = jax.device_get((self.state.done, self.state.count))
    ended = [i for i, owner in enumerate(self.owners) if owner is not None and done[i]]
    live = [i for i, owner in enumerate(self.owners) if owner is not None and not done[i]]
    fetched = None  # the outputs, copied to the host once, only when a row needs reading
    if should_stop is not None and live:
      fetched = jax.device_get((self.state.tokens, self.state.logprobs))
      ended += [i for i in live if should_stop(self.owners[i], fetched[0][i, :count[i]])]
    if not ended:
      return {}
    tokens, logprobs = fetched or jax.device_get((self.state.tokens, self.state.logprobs))
    finished = {}
    for i in ended:
      finished[self.owners[i]] = self.engine.generated(tokens[i], logprobs[i], int(count[i]))
      self.owners[i] = None
    # A mask of fixed shape: indexing by the list of ended rows would compile a program for
    # every count of rows that end together.
    retired = np.zeros(len(self.owners), bool)
    retired[ended] = True
    self.state = self.state._replace(done=self.state.done | retired)
    return finished

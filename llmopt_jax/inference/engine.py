"""The generation engine: token-id prompts in, generated ids and log-probs out, in batches.

Two ways to batch, same programs underneath (`decoding`):
  static      rows of a batch start together and the batch ends with its longest row;
  continuous  a fixed set of slots; when a row finishes, the next waiting prompt is prefilled
              into its slot while the other rows go on (`Slots`), so short outputs do not wait
              for long ones (Yu et al. 2022, Orca's iteration-level scheduling).
Both give each request the same tokens: a row's computation never reads another row, its
random key depends only on its own seed, and padding is never attended to.

Shapes come from buckets so a stream of prompts of every length compiles a handful of
programs: prompts are left-padded to a power of two (at least 16), a static batch's rows to a
power of two, and output buffers to a power of two (at least 16). `stats['compiles']` counts
the programs traced, for the tests' bound and the benchmark's report.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmopt_jax.inference import decoding
from llmopt_jax.inference.slots import Slots
from llmopt_jax.inference.sampling import SamplingParams, row_settings
from llmopt_jax.models.config import TransformerConfig

MIN_BUCKET = 16
STOP_CHECK_STEPS = 16


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
  """The smallest power of two >= max(n, minimum)."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Generated:
  """One request's output: its new tokens (an end-of-sequence id included), their
  log-probabilities, and why it ended: 'stop' (an end id) or 'length'."""
  tokens: np.ndarray
  logprobs: np.ndarray
  finish_reason: str


class Engine:
  """Generates from a decoder's parameters; see the module docstring.

  Args:
    graphdef, params: the model (`nnx.split` of a `Transformer` with an LM head); params may
      hold quantized kernels and may be sharded on a mesh.
    eos_ids: ids that end a row.
    max_batch: rows of a static batch and slots of continuous batching.
    max_prompt_tokens, max_new_tokens: the largest prompt and output accepted.
  """

  def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, *, eos_ids: Sequence[int],
               max_batch: int = 16, max_prompt_tokens: int = 1024, max_new_tokens: int = 256):
    self.graphdef, self.params = graphdef, params
    self.config: TransformerConfig = nnx.merge(graphdef, params).config
    if not self.config.lm_head:
      raise ValueError('generation needs a model with an LM head (a causal LM checkpoint)')
    self.eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    self.max_batch = max_batch
    self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
    self.stats = collections.Counter()
    self._prefill = jax.jit(self._counted(functools.partial(decoding.prefill, graphdef)),
                            static_argnames=('cache_length', 'output_length'))
    self._run = jax.jit(self._counted(functools.partial(decoding.run, graphdef)),
                        static_argnames=('until_any_done',), donate_argnums=(1,))
    self._insert = jax.jit(self._counted(decoding.insert), donate_argnums=(0,))

  def _counted(self, fn):
    """`fn`, counting its traces (one per compiled program)."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
      self.stats['compiles'] += 1
      return fn(*args, **kwargs)
    return traced

  def check(self, prompt: np.ndarray, params: SamplingParams) -> None:
    """A one-line error for a request the engine cannot serve."""
    if len(prompt) == 0:
      raise ValueError('the prompt is empty (it encodes to no tokens)')
    if len(prompt) > self.max_prompt_tokens:
      raise ValueError(f'the prompt has {len(prompt)} tokens; this engine takes at most '
                       f'{self.max_prompt_tokens} (max_prompt_tokens)')
    if params.max_new_tokens > self.max_new_tokens:
      raise ValueError(f'max_new_tokens={params.max_new_tokens} exceeds this engine\'s limit '
                       f'of {self.max_new_tokens}')
    table = self.config.max_positions
    if table and len(prompt) + params.max_new_tokens > table:
      raise ValueError(f'prompt ({len(prompt)} tokens) + max_new_tokens '
                       f'({params.max_new_tokens}) exceed the model\'s {table} positions')
    if np.any((prompt < 0) | (prompt >= self.config.vocab_size)):
      raise ValueError(f'prompt token ids must lie in [0, {self.config.vocab_size})')

  def generate(self, prompts: Sequence[np.ndarray], params: Sequence[SamplingParams], *,
               continuous: bool = True, should_stop=None) -> list[Generated]:
    """Every prompt's output, in order; checked first, so a bad request fails before any
    work. `should_stop(index, tokens)` may end a row early (continuous batching only; a
    caller cuts static outputs itself)."""
    if len(prompts) != len(params):
      raise ValueError(f'{len(prompts)} prompts but {len(params)} sampling settings')
    prompts = [np.asarray(p, np.int32) for p in prompts]
    for prompt, p in zip(prompts, params, strict=True):
      self.check(prompt, p)
    if not prompts:
      return []
    if continuous:
      return self._continuous(prompts, params, should_stop)
    out = []
    for start in range(0, len(prompts), self.max_batch):
      out += self._static(prompts[start:start + self.max_batch],
                          params[start:start + self.max_batch])
    return out

  def left_padded(self, prompts: Sequence[np.ndarray], rows: int, length: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) [rows, length]: each prompt at the right end of its row; id 0 pads."""
    tokens = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), np.int32)
    for i, prompt in enumerate(prompts):
      tokens[i, length - len(prompt):] = prompt
      mask[i, length - len(prompt):] = 1
    return tokens, mask

  def prefill(self, prompts: Sequence[np.ndarray], params: Sequence[SamplingParams], *,
              rows: int, cache_length: int, output_length: int) -> decoding.Decoding:
    """The prompts prefilled as the first rows of a batch of `rows` (the rest empty)."""
    length = bucket(max(len(p) for p in prompts))
    tokens, mask = self.left_padded(prompts, rows, length)
    limit = np.zeros(rows, np.int32)
    limit[:len(params)] = [p.max_new_tokens for p in params]
    self.stats['prefills'] += 1
    return self._prefill(self.params, tokens, mask, limit, row_settings(list(params), rows),
                         self.eos, cache_length=cache_length, output_length=output_length)

  def run(self, state: decoding.Decoding, max_steps: int, *, until_any_done: bool
          ) -> decoding.Decoding:
    self.stats['decode_calls'] += 1
    return self._run(self.params, state, self.eos, jnp.int32(max_steps),
                     until_any_done=until_any_done)

  def _static(self, prompts: list[np.ndarray], params: Sequence[SamplingParams]
              ) -> list[Generated]:
    rows = bucket(len(prompts), minimum=1)
    output_length = bucket(max(p.max_new_tokens for p in params))
    cache_length = bucket(max(len(p) for p in prompts)) + output_length
    state = self.prefill(prompts, params, rows=rows, cache_length=cache_length,
                         output_length=output_length)
    self.stats['batches'] += 1
    self.stats['max_rows'] = max(self.stats['max_rows'], len(prompts))
    state = self.run(state, output_length, until_any_done=False)
    tokens, logprobs, count = jax.device_get((state.tokens, state.logprobs, state.count))
    return [self.generated(tokens[i], logprobs[i], int(count[i])) for i in range(len(prompts))]

  def generated(self, tokens: np.ndarray, logprobs: np.ndarray, count: int) -> Generated:
    tokens, logprobs = tokens[:count].copy(), logprobs[:count].copy()
    ended = count > 0 and bool(np.isin(tokens[-1], np.asarray(self.eos)))
    return Generated(tokens, logprobs, 'stop' if ended else 'length')

  def _continuous(self, prompts: list[np.ndarray], params: Sequence[SamplingParams],
                  should_stop=None) -> list[Generated]:
    slots = Slots(self, prompt_length=bucket(max(len(p) for p in prompts)),
                  output_length=bucket(max(p.max_new_tokens for p in params)))
    waiting = collections.deque(range(len(prompts)))
    results: dict[int, Generated] = {}
    while waiting or slots.busy:
      while waiting and slots.free:
        i = waiting.popleft()
        slots.admit(i, prompts[i], params[i])
      # With stop strings, look at the text every few steps so a stopped row frees its slot.
      steps = STOP_CHECK_STEPS if should_stop else slots.output_length
      results.update(slots.advance(steps, should_stop))
    return [results[i] for i in range(len(prompts))]

"""Text in, text out: prompts encoded, outputs decoded and cut at stop strings.

The engine works on token ids; this layer adds the tokenizer. A stop string ends a completion
at its first occurrence: the text keeps what came before it, and the tokens and their
log-probabilities are those up to the token that completed it (what was actually generated
to get there). The same rule applies after the fact (static batching) and during decoding
(continuous batching frees the row as soon as a stop string appears), so both agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from llmopt_jax.inference.engine import Engine, Generated
from llmopt_jax.inference.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class Completion:
  prompt: str
  text: str
  tokens: tuple[int, ...]
  token_logprobs: tuple[float, ...]
  finish_reason: str     # 'stop' (end-of-sequence id or stop string) or 'length'
  prompt_tokens: int

  @property
  def logprob(self) -> float:
    """The log-probability of the whole completion under the model."""
    return float(sum(self.token_logprobs))

  def to_json(self) -> dict[str, Any]:
    return dict(prompt=self.prompt, completion=self.text, tokens=list(self.tokens),
                logprob=self.logprob, finish_reason=self.finish_reason,
                prompt_tokens=self.prompt_tokens)


def stop_index(text: str, stop: Sequence[str]) -> int | None:
  """Where the first stop string begins in `text`, or None."""
  found = [i for i in (text.find(s) for s in stop) if i >= 0]
  return min(found) if found else None


class TextGenerator:
  """An `Engine` with the tokenizer of its model (`encode`, `decode`)."""

  def __init__(self, engine: Engine, tokenizer):
    self.engine, self.tokenizer = engine, tokenizer

  def encode(self, prompt: str, params: SamplingParams) -> np.ndarray:
    """The prompt's ids, checked against the engine's limits (ValueError if not served)."""
    ids = np.asarray(self.tokenizer.encode(prompt), np.int32)
    self.engine.check(ids, params)
    return ids

  def complete(self, prompts: Sequence[str], params: Sequence[SamplingParams], *,
               continuous: bool = True) -> list[Completion]:
    ids = [self.encode(p, s) for p, s in zip(prompts, params, strict=True)]
    stops = {i: s.stop for i, s in enumerate(params) if s.stop}
    should_stop = None
    if stops:
      def should_stop(i, tokens):
        return i in stops and stop_index(self.tokenizer.decode(tokens), stops[i]) is not None
    out = self.engine.generate(ids, list(params), continuous=continuous,
                               should_stop=should_stop)
    return [self.finish(p, len(i), g, s.stop)
            for p, i, g, s in zip(prompts, ids, out, params, strict=True)]

  def finish(self, prompt: str, prompt_tokens: int, generated: Generated,
             stop: Sequence[str] = ()) -> Completion:
    """The `Completion` of a finished row: decoded, and cut at its first stop string."""
    tokens, logprobs = generated.tokens, generated.logprobs
    text, reason = self.tokenizer.decode(tokens), generated.finish_reason
    cut = stop_index(text, stop) if stop else None
    if cut is not None:
      n = next(n for n in range(1, len(tokens) + 1)
               if stop_index(self.tokenizer.decode(tokens[:n]), stop) is not None)
      tokens, logprobs, text, reason = tokens[:n], logprobs[:n], text[:cut], 'stop'
    return Completion(prompt, text, tuple(int(t) for t in tokens),
                      tuple(float(x) for x in logprobs), reason, prompt_tokens)

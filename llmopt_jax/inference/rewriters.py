"""Rewriting texts with a generator: paraphrases and back-translations, for data augmentation.

Two backends behind one interface, `Generator.generate(prompts, seeds) -> texts`:
`EngineGenerator`, a local causal LM (a Hugging Face directory or a finished run) in this
project's generation engine, every prompt of a call in one continuously batched pass; and
`EndpointGenerator`, any OpenAI-compatible endpoint (a hosted model, vLLM, Ollama, or the
`serve` stage), its requests in parallel threads. A rewrite is one prompt (paraphrase) or
two chained ones (back-translation: into a pivot language, then back into English).

Generation is the expensive part of augmentation, so every output is kept in a `RewriteCache`,
a JSON-lines file in the workdir appended after each batch: a rerun, a resumed run or another
stage over the same texts asks the generator only for what is missing. A key holds the
generator's name, the prompt and the copy's seed, so changing the model, the instruction or
the number of copies asks again, and nothing else does.

Outputs are cleaned (the first non-empty line, stripped of quotes); one that is empty or equal
to its input is returned as None, for the caller to drop. `label_preserving` is the filter that
keeps an augmented example only where a classifier (the teacher) predicts the same label for
it as for its original.

The fine-tune's augmentation ('paraphrase:p', 'backtranslate:p' in config.data.augment) runs
this over its training examples once per run: `data/augment/rewrites.py`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from llmopt_jax.data.augment import pipeline
from llmopt_jax.inference.sampling import SamplingParams
from llmopt_jax.inference.text import TextGenerator
from llmopt_jax.openai_client import ChatClient, ChatError

KINDS = pipeline.REWRITES  # 'paraphrase', 'backtranslate': the augmentation's names for them
PROMPTS = {
    'paraphrase': ('Rewrite the following text in other words, keeping its meaning and '
                   'intent. Answer with the rewritten text only.\nText: {text}\nRewritten:'),
    'to_pivot': ('Translate the following text into {pivot}. Answer with the translation '
                 'only.\nText: {text}\nTranslation:'),
    'from_pivot': ('Translate the following text into English. Answer with the translation '
                   'only.\nText: {text}\nTranslation:'),
}


class Generator(Protocol):
  name: str  # the backend and model, part of every cache key

  def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[str | None]:
    ...  # None: no output this time (not cached)


@dataclasses.dataclass(frozen=True)
class RewriteSpec:
  kind: str = 'paraphrase'     # 'paraphrase' | 'backtranslate'
  copies: int = 1              # rewrites per text, each with its own seed
  pivot: str = 'French'        # back-translation's language in between
  seed: int = 0

  def __post_init__(self) -> None:
    if self.kind not in KINDS:
      raise ValueError(f'rewrite kind {self.kind!r}; choose from {list(KINDS)}')
    if self.copies < 1:
      raise ValueError(f'rewrite copies={self.copies}: at least 1')


class EngineGenerator:
  """A local causal LM in the project's engine; sampled at `temperature`, one line each."""

  def __init__(self, text: TextGenerator, name: str, *, temperature: float = 0.7,
               max_new_tokens: int = 64):
    self.text, self.name = text, f'engine:{name}'
    self.temperature, self.max_new_tokens = temperature, max_new_tokens

  def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[str]:
    params = [SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                             seed=seed, stop=('\n',)) for seed in seeds]
    return [c.text for c in self.text.complete(list(prompts), params)]


class EndpointGenerator:
  """An OpenAI-compatible chat endpoint, `concurrency` requests at a time. A request that
  fails (timeout, HTTP error) yields None: no rewrite this time, rather than stopping the
  whole run, and not cached, so the next run asks again."""

  def __init__(self, client: ChatClient, concurrency: int = 4):
    self.client, self.concurrency = client, concurrency
    self.name = f'endpoint:{client.base_url}:{client.model}'
    self.failures, self.last_error = 0, ''

  def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[str | None]:
    del seeds  # chat endpoints sample on their own; copies differ by temperature
    with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
      return list(pool.map(self._one, prompts))

  def _one(self, prompt: str) -> str | None:
    try:
      return self.client.chat([{'role': 'user', 'content': prompt}]).text
    except ChatError as e:
      self.failures, self.last_error = self.failures + 1, str(e)
      return None


class RewriteCache:
  """key -> output, read from and appended to a JSON-lines file (None path = memory only)."""

  def __init__(self, path: str | None):
    self.path, self.entries = path, {}
    if path and os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        for line in f:
          if line.strip():
            record = json.loads(line)
            self.entries[record['key']] = record['output']

  def get(self, key: str) -> str | None:
    return self.entries.get(key)

  def add(self, items: dict[str, str]) -> None:
    self.entries.update(items)
    if self.path and items:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      with open(self.path, 'a', encoding='utf-8') as f:
        f.writelines(json.dumps({'key': k, 'output': v}) + '\n' for k, v in items.items())
        f.flush()
        os.fsync(f.fileno())


def rewrite(texts: Sequence[str], spec: RewriteSpec, generator: Generator, cache: RewriteCache,
            batch_size: int = 64) -> list[list[str | None]]:
  """`spec.copies` rewrites of each text (None where the generator gave nothing new)."""
  jobs = [(text, spec.seed + copy) for text in texts for copy in range(spec.copies)]
  if spec.kind == 'paraphrase':
    outputs = _step(jobs, PROMPTS['paraphrase'], {}, generator, cache, batch_size)
  else:
    pivots = _step(jobs, PROMPTS['to_pivot'], {'pivot': spec.pivot}, generator, cache,
                   batch_size)
    back = [(p, seed) for p, (_, seed) in zip(pivots, jobs, strict=True) if p]
    returned = iter(_step(back, PROMPTS['from_pivot'], {}, generator, cache, batch_size))
    outputs = [next(returned) if p else None for p in pivots]
  rows = [_usable(out, text) for out, (text, _) in zip(outputs, jobs, strict=True)]
  return [rows[i:i + spec.copies] for i in range(0, len(rows), spec.copies)]


def _step(jobs: list[tuple[str, int]], template: str, fields: dict[str, str],
          generator: Generator, cache: RewriteCache, batch_size: int) -> list[str | None]:
  """One generation over `jobs` (text, seed): cached outputs reused, the rest generated in
  batches (each distinct prompt and seed once) and cached as they come."""
  prompts = [template.format(text=text, **fields) for text, _ in jobs]
  keys = [_key(generator.name, prompt, seed)
          for prompt, (_, seed) in zip(prompts, jobs, strict=True)]
  first: dict[str, int] = {}
  for i, key in enumerate(keys):
    if cache.get(key) is None:
      first.setdefault(key, i)
  todo = list(first.values())
  for start in range(0, len(todo), batch_size):
    chunk = todo[start:start + batch_size]
    out = generator.generate([prompts[i] for i in chunk], [jobs[i][1] for i in chunk])
    cache.add({keys[i]: _clean(text) for i, text in zip(chunk, out, strict=True)
               if text is not None})  # a failed request is asked again next time
  return [cache.get(k) for k in keys]  # None where the generator failed


def _key(generator: str, prompt: str, seed: int) -> str:
  return hashlib.sha256(json.dumps([generator, prompt, seed]).encode()).hexdigest()


def _clean(text: str) -> str:
  """The first non-empty line, without surrounding whitespace and quotes."""
  line = next((s for s in text.strip().splitlines() if s.strip()), '')
  return line.strip().strip('"\'“”').strip()


def _usable(output: str | None, original: str) -> str | None:
  if not output or output.casefold() == original.strip().casefold():
    return None
  return output


def label_preserving(originals: Sequence[str], rewrites: Sequence[str],
                     predict: Callable[[list[str]], np.ndarray]) -> np.ndarray:
  """bool[n]: rewrite i keeps the label the classifier `predict` gives original i."""
  before = np.asarray(predict(list(originals)))
  after = np.asarray(predict(list(rewrites)))
  return before == after

"""The training examples' rewrites: generated once per run, before training, kept in its workdir.

Paraphrases and back-translations cost a model call each, so they are not drawn per batch
like the edits: every training example (after a few-shot cut) gets `augment_copies` of them
(copy k of the pipeline reads rewrite k - 1 in every epoch, `pipeline.Augmenter`), written to

  <workdir>/augment/rewrites.jsonl   every generator output (`inference/rewriters.py`
                                     `RewriteCache`), appended per batch: an interrupted or
                                     repeated run asks only for what is missing
  <workdir>/augment/kept.json        the rewrites this run trains on, after the label filter,
                                     with a fingerprint of what made them

The kept file is written once, before the first step; a run that finds it with the same
fingerprint (a resumed run) reads it and does nothing else: no model is loaded and no request
is sent, and in particular a request that failed is not retried, since the run so far trained
without that rewrite. So a resumed run's batches stay bit-identical to an uninterrupted
run's (to ask again for what failed, delete kept.json before training starts). When every
request fails, nothing is kept and the run stops with a one-line error. Settings or training
texts that differ from the fingerprint generate again, from the cache. The generator is built
on first use, so a run whose outputs are all cached needs neither the model nor the server.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np

from llmopt_jax import report, sharding
from llmopt_jax.data.augment import pipeline
from llmopt_jax.data.augment.config import AugmentConfig
from llmopt_jax.data.augment.rewrite_config import FIELD, RewriteConfig
from llmopt_jax.inference import rewriters
from llmopt_jax.inference.rewriters import RewriteSpec
from llmopt_jax.openai_client import ChatClient

DIRECTORY = 'augment'
CACHE = 'rewrites.jsonl'
KEPT = 'kept.json'

Rows = list[list[str | None]]  # per example, per copy: its rewrite or None


def training_rewrites(texts: Sequence[str], augment: AugmentConfig, *, seed: int, workdir: str,
                      mesh: ml_collections.ConfigDict, label_batch: int,
                      teacher_dir: str | None = None) -> pipeline.Rewrites:
  """Example index -> its rewrites (one per copy), for the rewrite operation of `augment`.

  `mesh`: the run's mesh section, for a local generator or classifier; `label_batch`: rows
  per classifier batch (a multiple of the batch's devices); `teacher_dir`: what
  keep_label_of='teacher' means (a distillation's teacher), None elsewhere.
  """
  settings = augment.generator
  spec = RewriteSpec(augment.rewrite.name, augment.copies, settings.pivot, seed)
  directory = os.path.join(workdir, DIRECTORY)
  fingerprint = _fingerprint(texts, spec, settings)
  rows = _read_kept(os.path.join(directory, KEPT), fingerprint)
  if rows is not None:
    report.say(f'Rewrites: {sum(r is not None for row in rows for r in row)} for '
               f'{len(texts)} training examples, as generated before, from {directory}')
  else:
    if jax.process_count() > 1:
      raise ValueError(f'{FIELD}: rewrites are generated in a single process; generate them '
                       f'with a one-process run on this workdir first')
    label_dir = settings.label_model(teacher_dir)
    if label_dir and not os.path.isdir(label_dir):  # before paying for any generation
      raise ValueError(f'{FIELD}.keep_label_of={label_dir!r}: no such directory; name a '
                       f'finished classification workdir')
    rows = _generate(texts, spec, settings, directory, mesh, label_batch, label_dir)
    _write_kept(os.path.join(directory, KEPT), fingerprint, spec, settings, rows)
  return {i: tuple(row) for i, row in enumerate(rows) if any(row)}


def _generate(texts: Sequence[str], spec: RewriteSpec, settings: RewriteConfig,
              directory: str, mesh: ml_collections.ConfigDict, label_batch: int,
              label_dir: str) -> Rows:
  generator = _OnFirstUse(generator_name(settings), lambda: build_generator(settings, mesh))
  rows = rewriters.rewrite(texts, spec, generator, rewriters.RewriteCache(
      os.path.join(directory, CACHE)), batch_size=settings.batch_size)
  generated = sum(r is not None for row in rows for r in row)
  if (failed := getattr(generator.built, 'failures', 0)) and not generated:
    raise ValueError(f'{FIELD}.base_url={settings.base_url!r}: all {failed} requests failed '
                     f'(the last: {generator.built.last_error}); nothing is kept, so the next '
                     f'run asks again')
  dropped = _filter(texts, rows, label_dir, mesh, label_batch) if label_dir and generated else 0
  report.say(f'Rewrites ({spec.kind} x {spec.copies} of {len(texts)} training examples, '
             f'{generator.name}): {generated - dropped} kept, '
             f'{len(texts) * spec.copies - generated} not generated'
             + (f', {dropped} changed the label of {label_dir}' if label_dir else '')
             + f'; in {directory}')
  return rows


def generator_name(settings: RewriteConfig) -> str:
  """The generator's name as `rewriters` keys its cache, known before it is built."""
  if settings.backend == 'engine':
    return f'engine:{settings.model}'
  return f'endpoint:{settings.base_url}:{settings.model}'


def build_generator(settings: RewriteConfig, mesh: ml_collections.ConfigDict
                    ) -> rewriters.Generator:
  """The backend of `settings`, checked to be there (one-line errors naming the field)."""
  if settings.backend == 'endpoint':
    client = ChatClient(settings.base_url, settings.model, settings.api_key_env,
                        timeout_s=settings.timeout_s, temperature=settings.temperature,
                        max_tokens=settings.max_new_tokens, field=FIELD)
    client.check_reachable()
    return rewriters.EndpointGenerator(client, settings.concurrency)
  # Imported here: the loader reaches the quantization stages' scorer, which builds tasks
  # from this package's callers (an import cycle at module level).
  from llmopt_jax.inference import chat, loading
  from llmopt_jax.inference.engine import Engine
  from llmopt_jax.inference.text import TextGenerator
  model = _load(settings.model, f'{FIELD}.model', mesh, loading)
  if model.kind != 'lm':
    raise ValueError(f'{FIELD}.model={settings.model!r} is a {model.kind}; rewriting needs a '
                     f'causal language model')
  engine = Engine(model.graphdef, model.params, eos_ids=chat.model_end_ids(model),
                  max_batch=settings.batch_size, max_new_tokens=settings.max_new_tokens)
  return rewriters.EngineGenerator(TextGenerator(engine, model.tokenizer), settings.model,
                                   temperature=settings.temperature,
                                   max_new_tokens=settings.max_new_tokens)


def _filter(texts: Sequence[str], rows: Rows, label_dir: str, mesh: ml_collections.ConfigDict,
            batch_size: int) -> int:
  """Sets to None, in place, each rewrite whose predicted label is not its original's; returns
  how many."""
  from llmopt_jax.inference import classify, loading  # see build_generator
  model = _load(label_dir, f'{FIELD}.keep_label_of', mesh, loading)
  try:
    classifier = classify.Classifier(model, *sharding.from_config(mesh), batch_size=batch_size)
  except ValueError as e:
    raise ValueError(f'{FIELD}.keep_label_of={label_dir!r}: {e}') from None
  predict: Callable[[list[str]], np.ndarray] = lambda batch: classifier.predict(batch).argmax(-1)
  places = [(i, k) for i, row in enumerate(rows) for k, r in enumerate(row) if r is not None]
  keep = rewriters.label_preserving([texts[i] for i, _ in places],
                                    [rows[i][k] for i, k in places], predict)
  for (i, k), kept in zip(places, keep, strict=True):
    if not kept:
      rows[i][k] = None
  return int(np.sum(~keep))


def _load(path: str, field: str, mesh: ml_collections.ConfigDict, loading):
  try:
    return loading.load(path, *sharding.from_config(mesh))
  except (OSError, ValueError) as e:
    raise ValueError(f'{field}={path!r}: {e}') from None


class _OnFirstUse:
  """A generator built when first asked for text, so a fully cached run loads no model and
  reaches no server."""

  def __init__(self, name: str, build: Callable[[], rewriters.Generator]):
    self.name, self._build = name, build
    self.built: rewriters.Generator | None = None

  def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[str | None]:
    if self.built is None:
      self.built = self._build()
      if self.built.name != self.name:  # the cache keys would not be the generator's
        raise AssertionError(f'generator {self.built.name!r} built for {self.name!r}')
    return self.built.generate(prompts, seeds)


def _fingerprint(texts: Sequence[str], spec: RewriteSpec, settings: RewriteConfig) -> str:
  """A digest of everything the kept rewrites depend on: the texts, the operation, the
  generator and its sampling, the filter, and the prompts' wording."""
  record = [list(texts), spec.kind, spec.copies, spec.pivot, spec.seed,
            settings.fingerprint(), rewriters.PROMPTS]
  return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _read_kept(path: str, fingerprint: str) -> Rows | None:
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    kept = json.load(f)
  return kept['rewrites'] if kept.get('fingerprint') == fingerprint else None


def _write_kept(path: str, fingerprint: str, spec: RewriteSpec, settings: RewriteConfig,
                rows: Rows) -> None:
  """Atomically: a run killed while writing leaves no half file to train on."""
  record = {'fingerprint': fingerprint, 'kind': spec.kind, 'copies': spec.copies,
            'seed': spec.seed, 'generator': settings.fingerprint(), 'rewrites': rows}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(record, f, ensure_ascii=False)
  os.replace(path + '.tmp', path)

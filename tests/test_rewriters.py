"""Text rewriters for augmentation: paraphrase and back-translation through the project's own
engine and through a real OpenAI-compatible HTTP server on loopback.

Properties: the engine backend returns exactly what the engine generates for the same prompts
and seeds (one continuous pass), deterministically; the endpoint backend sends each prompt as
a chat request and back-translation chains two (into the pivot language, then back); every
output is cached on disk, so a second run over the same texts, even in a new process (a new
cache object on the same file), asks the generator nothing; a failed request is not cached and
is asked again; outputs equal to their input or empty are dropped; the label filter keeps a
rewrite only where the classifier's label is unchanged.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmopt_jax import configlib, sharding
from llmopt_jax.inference import loading, rewriters
from llmopt_jax.inference.engine import Engine
from llmopt_jax.inference.sampling import SamplingParams
from llmopt_jax.inference.text import TextGenerator
from llmopt_jax.openai_client import ChatClient
from openai_stub import Answer, OpenAIStub

TEXTS = ['how do i top up my card', 'my card was declined', 'where is my new card']


@pytest.fixture
def stub():
  server = OpenAIStub()
  yield server
  server.stop()


def endpoint(stub: OpenAIStub) -> rewriters.EndpointGenerator:
  client = ChatClient(stub.base_url, stub.model, timeout_s=5.0, field='config.augment')
  return rewriters.EndpointGenerator(client, concurrency=1)  # one at a time: scripted order


def test_paraphrases_come_from_the_endpoint_and_are_cached_on_disk(stub, tmp_path):
  stub.script('"Top up my card, how?"', 'My card got declined.\nExtra line', 'WHERE IS MY NEW CARD')
  path = str(tmp_path / 'rewrites.jsonl')
  spec = rewriters.RewriteSpec('paraphrase')
  out = rewriters.rewrite(TEXTS, spec, endpoint(stub), rewriters.RewriteCache(path))
  # Cleaned to the first line without quotes; a rewrite equal to its input is dropped.
  assert out == [['Top up my card, how?'], ['My card got declined.'], [None]]
  assert [r.messages[-1]['content'] for r in stub.requests] == [
      rewriters.PROMPTS['paraphrase'].format(text=t) for t in TEXTS]

  again = rewriters.rewrite(TEXTS, spec, endpoint(stub), rewriters.RewriteCache(path))
  assert again == out and len(stub.requests) == 3  # all from the file: nothing asked


def test_back_translation_chains_two_requests_through_the_pivot(stub, tmp_path):
  stub.script('Comment recharger ma carte', 'How can I recharge my card')
  spec = rewriters.RewriteSpec('backtranslate', pivot='French')
  out = rewriters.rewrite(TEXTS[:1], spec, endpoint(stub),
                          rewriters.RewriteCache(str(tmp_path / 'bt.jsonl')))
  assert out == [['How can I recharge my card']]
  first, second = (r.messages[-1]['content'] for r in stub.requests)
  assert first == rewriters.PROMPTS['to_pivot'].format(text=TEXTS[0], pivot='French')
  assert second == rewriters.PROMPTS['from_pivot'].format(text='Comment recharger ma carte')


def test_a_failed_request_gives_no_rewrite_and_is_asked_again(stub, tmp_path):
  stub.script(Answer(status=503), 'a fresh rewrite')
  path = str(tmp_path / 'rewrites.jsonl')
  spec = rewriters.RewriteSpec('paraphrase')
  generator = endpoint(stub)
  assert rewriters.rewrite(TEXTS[:1], spec, generator, rewriters.RewriteCache(path)) == [[None]]
  assert generator.failures == 1
  assert rewriters.rewrite(TEXTS[:1], spec, endpoint(stub),
                           rewriters.RewriteCache(path)) == [['a fresh rewrite']]
  with open(path, encoding='utf-8') as f:
    assert [json.loads(line)['output'] for line in f] == ['a fresh rewrite']


def test_engine_backend_returns_what_the_engine_generates(pretrain_workdir, tmp_path):
  """Two copies per text, sampled: each equals the engine's own completion of that prompt
  with that seed (cut at the newline, cleaned), and a second run is served from the cache."""
  model = loading.load(pretrain_workdir, *sharding.from_config(configlib.mesh('data')))
  text = TextGenerator(Engine(model.graphdef, model.params, eos_ids=[], max_batch=8,
                              max_new_tokens=16), model.tokenizer)
  generator = rewriters.EngineGenerator(text, 'tiny', temperature=1.0, max_new_tokens=16)
  spec = rewriters.RewriteSpec('paraphrase', copies=2, seed=5)
  path = str(tmp_path / 'rewrites.jsonl')
  out = rewriters.rewrite(TEXTS, spec, generator, rewriters.RewriteCache(path))

  prompts = [rewriters.PROMPTS['paraphrase'].format(text=t) for t in TEXTS for _ in range(2)]
  params_ = [SamplingParams(max_new_tokens=16, temperature=1.0, seed=5 + k % 2, stop=('\n',))
             for k in range(len(prompts))]
  direct = [rewriters._clean(c.text) for c in text.complete(prompts, params_)]
  expected = [[d or None for d in direct[i:i + 2]] for i in range(0, len(direct), 2)]
  assert out == [[o if o != t else None for o in row] for row, t in zip(expected, TEXTS)]
  assert sum(o is not None for row in out for o in row) >= 3  # the comparison is not vacuous

  compiles = text.engine.stats['compiles']
  assert rewriters.rewrite(TEXTS, spec, generator, rewriters.RewriteCache(path)) == out
  assert text.engine.stats['compiles'] == compiles  # nothing generated: all cached


def test_label_filter_keeps_rewrites_whose_label_is_unchanged():
  def predict(texts):  # a classifier stand-in: the label is whether 'card' is mentioned
    return np.array(['card' in t for t in texts])
  keep = rewriters.label_preserving(TEXTS, ['top up the card', 'payment refused', 'new card?'],
                                    predict)
  assert keep.tolist() == [True, False, True]


@pytest.mark.parametrize('kind, copies', [('summarize', 1), ('paraphrase', 0)])
def test_bad_rewrite_settings_fail_in_one_line(kind, copies):
  with pytest.raises(ValueError, match=kind if kind != 'paraphrase' else 'copies'):
    rewriters.RewriteSpec(kind, copies=copies)

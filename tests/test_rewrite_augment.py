"""Paraphrase and back-translation as augmentation operations of the classification fine-tune
(llmopt_jax/data/augment/: rewrites.py, rewrite_config.py, config.py, pipeline.py).

Properties: a few-shot fine-tune asks the endpoint (a real OpenAI-compatible server on
loopback, tests/openai_stub.py) once per K-shot example and copy, and copy k of example i is
its original or its rewrite k - 1, never anything else; a rebuilt (resumed) task asks nothing
and retries no failure; without the kept file only the missing rewrite is asked for; the rate
is the binomial chance a copy starts from its rewrite, rate 0 the plain pipeline; the engine
backend gives the engine's own completions; keep_label_of drops exactly the rewrites whose
predicted label changed; bad settings are one-line errors naming the field.
"""

import json
import math
import os
import shutil
import socket

import numpy as np
import pytest

from conftest import load_config
from llmopt_jax import configlib, hf, sharding
from llmopt_jax.data import classification as classification_data, intents
from llmopt_jax.data.augment import pipeline, rewrites
from llmopt_jax.data.augment.config import AugmentConfig
from llmopt_jax.inference import rewriters
from llmopt_jax.tasks import classification
from openai_stub import Answer, OpenAIStub

COPIES, SHOTS = 2, 2


def _queries(n: int) -> list[str]:
  """n Banking77 test queries spread over the intents (the file is sorted by intent)."""
  texts = intents.banking77()['test'].texts
  return list(texts[::len(texts) // n][:n])


def _config(tiny_bert_dir: str, stub: OpenAIStub):
  """configs/finetune.py:tiny on 2 Banking77 shots per class with 2 paraphrased copies: the
  shapes and schedule of test_augment.py's fine-tune, so the two share compiled programs."""
  config = load_config('finetune', 'tiny')
  config.init.model = tiny_bert_dir
  config.data.update(shots_per_class=SHOTS, augment=('paraphrase:0.5',), augment_copies=COPIES)
  config.data.rewrite.update(backend='endpoint', base_url=stub.base_url, model=stub.model,
                             concurrency=1, timeout_s=5.0)  # one at a time: scripted order
  config.train.update(num_steps=3, eval_every=3, eval_batches=1)
  config.checkpoint.every_steps = 3
  config.test_batches = 1
  config.export = False
  return config


@pytest.fixture
def stub():
  server = OpenAIStub()
  yield server
  server.stop()


def _kept(workdir) -> list[list[str | None]]:
  with open(os.path.join(workdir, 'augment', 'kept.json'), encoding='utf-8') as f:
    return json.load(f)['rewrites']


def test_few_shot_fine_tune_on_an_endpoints_rewrites(tiny_bert_dir, stub, tmp_path):
  """One fine-tune (its endpoint fails once), then what a resumed or repeated run and the
  label filter do with it: one test, as separate ones could each make the run on another
  xdist worker."""
  from llmopt_jax.stages import finetune
  config = _config(tiny_bert_dir, stub)
  answers = [f'paraphrase number {k}' for k in range(SHOTS * 77 * COPIES)]
  answers[5] = Answer(status=503)  # no rewrite 1 of example 2 this time
  stub.script(*answers)
  workdir = str(tmp_path / 'workdir')
  finetune.run(config, workdir)
  expected = [[a if isinstance(a, str) else None for a in answers[i:i + COPIES]]
              for i in range(0, len(answers), COPIES)]
  assert _kept(workdir) == expected and expected[2][1] is None

  built = classification.fine_tuning(config, None, workdir)  # a resumed run's task
  assert len(stub.requests) == len(answers)  # from the kept file: nothing asked, nor retried
  train = built.splits['train']
  assert len(train) == SHOTS * 77
  assert [r.messages[-1]['content'] for r in stub.requests] == [
      rewriters.PROMPTS['paraphrase'].format(text=t)
      for t in train.texts for _ in range(COPIES)]  # the K shots, nothing else
  _check_batches(built, config.seed, expected)
  _check_rerun_asks_only_what_is_missing(config, workdir, stub, expected)
  _check_label_filter(workdir, stub, tmp_path)


def _check_batches(built, seed: int, expected) -> None:
  """Every row of two epochs: copy 0 is the original, copy k its original or rewrite k - 1,
  the rewrite at the configured rate."""
  train, batch_size = built.splits['train'], 32
  n, epochs = len(train), 2
  batches = [next(built.task.train_data) for _ in range(epochs * n * (1 + COPIES) // batch_size)]
  tokens = np.concatenate([b['tokens'] for b in batches])
  rows = np.concatenate([classification_data.epoch_order(
      np.tile(train.labels, 1 + COPIES), seed, e) for e in range(epochs)])
  encoded = lambda text: built.encode([text])[0][0]  # noqa: E731
  draws = started_from_rewrite = 0
  for row, ids in zip(rows[:len(tokens)], tokens, strict=True):
    i, copy = row % n, row // n
    rewrite = expected[i][copy - 1] if copy else None
    from_original = np.array_equal(ids, encoded(train.texts[i]))
    from_rewrite = rewrite is not None and np.array_equal(ids, encoded(rewrite))
    assert from_original or from_rewrite, (i, copy)
    draws += rewrite is not None
    started_from_rewrite += from_rewrite
  assert abs(started_from_rewrite / draws - 0.5) <= 4 * math.sqrt(0.25 / draws)


def _check_rerun_asks_only_what_is_missing(config, workdir: str, stub, expected) -> None:
  """Without the kept file (a new run on the workdir) the cache answers all but the failed
  request, which is asked again."""
  asked = len(stub.requests)
  os.remove(os.path.join(workdir, 'augment', 'kept.json'))
  stub.script('a second try')
  classification.fine_tuning(config, None, workdir)
  assert len(stub.requests) == asked + 1
  after = _kept(workdir)
  assert after[2][1] == 'a second try'
  after[2][1] = None
  assert after == expected


def _check_label_filter(classifier_dir: str, stub, tmp_path) -> None:
  """keep_label_of=<the finished fine-tune>: a rewrite stays exactly where that classifier
  predicts the label it predicts for the original."""
  from llmopt_jax.inference import classify, loading
  texts = _queries(20)
  candidates = texts[5:] + texts[:5]  # each text's "rewrite" is another intent's query
  stub.script(*candidates)
  augment = AugmentConfig.from_config({
      'augment': ('paraphrase:0.5',), 'augment_copies': 1,
      'rewrite': {'base_url': stub.base_url, 'model': stub.model, 'concurrency': 1,
                  'keep_label_of': classifier_dir}})
  mesh = configlib.mesh('data')
  out = rewrites.training_rewrites(texts, augment, seed=0, workdir=str(tmp_path / 'filtered'),
                                   mesh=mesh, label_batch=8)
  model = loading.load(classifier_dir, *sharding.from_config(mesh))
  predict = classify.Classifier(model, *sharding.from_config(mesh), batch_size=8).predict
  same = predict(texts).argmax(-1) == predict(candidates).argmax(-1)
  assert out == {i: (c,) for i, (c, keep) in enumerate(zip(candidates, same)) if keep}
  assert 0 < same.sum() < len(texts)  # the filter kept some and dropped some


def _augmenter(rate: float, table: pipeline.Rewrites, ops=('synonym:0.3',)):
  data = {'augment': (f'paraphrase:{rate}', *ops), 'augment_copies': 2,
          'rewrite': {'model': 'm'}}
  return AugmentConfig.from_config(data).build(3, None, table)


def test_rate_is_the_chance_a_copy_starts_from_its_rewrite():
  n, epochs, rate = 200, 5, 0.3
  texts = [f'query {i} about my lost card' for i in range(n)]
  table = {i: (f'first rewrite {i}', f'second rewrite {i}') for i in range(n)}
  augmenter = _augmenter(rate, table, ops=())
  hits = 0
  for e in range(epochs):
    for i in range(n):
      for copy in (1, 2):
        out = augmenter(texts[i], e, i, copy)
        assert out in (texts[i], table[i][copy - 1])  # copy k reads rewrite k - 1 only
        hits += out != texts[i]
  draws = epochs * n * 2
  assert abs(hits / draws - rate) <= 4 * math.sqrt(rate * (1 - rate) / draws)
  # Rate 0, or no rewrite, is exactly the plain pipeline; later edits change a rewrite as
  # they would the original.
  plain = AugmentConfig.from_config({'augment': ('synonym:0.3',), 'augment_copies': 2}
                                    ).build(3, None)
  zero, missing = _augmenter(0.0, table), _augmenter(1.0, {})
  always = _augmenter(1.0, {0: ('my card was lost', None)})
  for e, i, copy in [(0, 0, 1), (1, 5, 2), (2, 9, 1)]:
    assert zero(texts[i], e, i, copy) == plain(texts[i], e, i, copy)
    assert missing(texts[i], e, i, copy) == plain(texts[i], e, i, copy)
  assert always(texts[0], 0, 0, 2) == plain(texts[0], 0, 0, 2)  # rewrite 1 of 0 is None
  assert always(texts[0], 4, 0, 1) == plain('my card was lost', 4, 0, 1)


def test_engine_backend_rewrites_are_the_engines_completions(tmp_path):
  """Two copies of three texts from a random Llama in the engine: each is the engine's own
  completion of that prompt with seed + copy, cleaned; a second run needs no model at all."""
  from llmopt_jax.inference import chat, loading
  from llmopt_jax.inference.engine import Engine
  from llmopt_jax.inference.sampling import SamplingParams
  from llmopt_jax.inference.text import TextGenerator
  model_dir = _tiny_llama(str(tmp_path / 'llama'))
  texts, seed, mesh = _queries(3), 4, configlib.mesh('data')
  augment = AugmentConfig.from_config({
      'augment': ('paraphrase:0.5',), 'augment_copies': 2,
      'rewrite': {'backend': 'engine', 'model': model_dir, 'temperature': 1.0,
                  'max_new_tokens': 8, 'batch_size': 8}})
  workdir = str(tmp_path / 'run')
  out = rewrites.training_rewrites(texts, augment, seed=seed, workdir=workdir, mesh=mesh,
                                   label_batch=8)

  model = loading.load(model_dir, *sharding.from_config(mesh))
  text = TextGenerator(Engine(model.graphdef, model.params, eos_ids=chat.model_end_ids(model),
                              max_batch=8, max_new_tokens=8), model.tokenizer)
  prompts = [rewriters.PROMPTS['paraphrase'].format(text=t) for t in texts for _ in range(2)]
  params = [SamplingParams(max_new_tokens=8, temperature=1.0, seed=seed + k % 2, stop=('\n',))
            for k in range(len(prompts))]
  direct = [rewriters._usable(rewriters._clean(c.text), texts[k // 2])
            for k, c in enumerate(text.complete(prompts, params))]
  rows = [tuple(direct[2 * i:2 * i + 2]) for i in range(len(texts))]
  assert out == {i: row for i, row in enumerate(rows) if any(row)}
  assert sum(r is not None for row in out.values() for r in row) >= 3  # not vacuous

  shutil.rmtree(model_dir)  # neither the kept file nor the cache needs the model again
  assert rewrites.training_rewrites(texts, augment, seed=seed, workdir=workdir, mesh=mesh,
                                    label_batch=8) == out
  os.remove(os.path.join(workdir, 'augment', 'kept.json'))
  assert rewrites.training_rewrites(texts, augment, seed=seed, workdir=workdir, mesh=mesh,
                                    label_batch=8) == out


def _tiny_llama(directory: str) -> str:
  """A random 1-layer Llama with MiniLM's tokenizer, as a Hugging Face causal LM directory."""
  import jax
  from flax import nnx
  from llmopt_jax.hf import configs as hf_configs
  from llmopt_jax.models.transformer import Transformer
  config = hf_configs.config_from_hf({
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': 30522,
      'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 1,
      'num_attention_heads': 2, 'num_key_value_heads': 1, 'max_position_embeddings': 512,
      'tie_word_embeddings': True})
  params = jax.jit(lambda: nnx.state(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param))()
  return hf.export(params, config, directory, tokenizer_dir=hf.minilm_path())


def _closed_port_url() -> str:  # nothing listens there: the port was just freed
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  return f'http://127.0.0.1:{port}/v1'


@pytest.mark.parametrize('augment, rewrite, error', [
    (None, {'backend': 'vllm'}, r"config.data.rewrite.backend='vllm'; choose from \['engine', "),
    (None, {'model': ''}, r"config.data.rewrite.model='': name the model \(the endpoint's"),
    (None, {'concurrency': 0}, r'config.data.rewrite.concurrency=0 must be an integer >= 1'),
    (None, {'timeout_s': 0}, r'config.data.rewrite.timeout_s=0 must be a number > 0'),
    (None, {'pivot': ''}, r"config.data.rewrite.pivot='': name the language"),
    (None, {'colour': 'red'}, r'config.data.rewrite.colour: no such field'),
    (('paraphrase:0.5', 'backtranslate:0.2'), {},
     r"config.data.augment\[1\]='backtranslate:0.2': a second rewrite operation; at most one"),
    (('synonym:0.1', 'paraphrase:0.5'), {},
     r"config.data.augment\[1\]='paraphrase:0.5': a rewrite operation comes first"),
    (('backtranslate:1.5',), {}, r"augment\[0\]='backtranslate:1.5': rate 1.5 is outside"),
])
def test_bad_settings_are_one_line_errors_naming_the_field(augment, rewrite, error):
  data = load_config('finetune', 'tiny').data.to_dict()
  data['augment'] = augment or ('paraphrase:0.5',)
  data['rewrite'].update({'model': 'some-model', **rewrite})
  with pytest.raises(ValueError, match=error) as raised:
    AugmentConfig.from_config(data)
  assert '\n' not in str(raised.value)


def test_rewrites_outside_a_classification_fine_tunes_data_are_refused():
  from llmopt_jax.tasks.consistency_training import ConsistencyConfig
  config = load_config('finetune', 'tiny')
  config.data.shots_per_class = 2
  config.consistency.update(weight=1.0, augment=('paraphrase:0.3',))
  with pytest.raises(ValueError, match=r"config.consistency.augment\[0\]='paraphrase:0.3': "
                                       r'rewrite operations apply to config.data.augment of'):
    ConsistencyConfig.from_config(config)
  data = load_config('multitask', 'tiny').data
  data.augment = ('backtranslate:0.5',)
  with pytest.raises(ValueError, match=r"config.data.augment\[0\]='backtranslate:0.5': rewrite "
                                       r'operations apply to config.data.augment of a '
                                       r'classification fine-tune'):
    AugmentConfig.from_config(data)


@pytest.mark.parametrize('rewrite, error', [
    ({}, (r"config.data.rewrite.base_url='http://127.0.0.1:\d+/v1': no OpenAI-compatible "
          r'server answers there')),
    ({'base_url': 'localhost:8000'},
     r"config.data.rewrite.base_url='localhost:8000': an http\(s\) URL"),
    ({'api_key_env': 'LLMOPT_NO_SUCH_KEY'},
     r"config.data.rewrite.api_key_env='LLMOPT_NO_SUCH_KEY': no such environment variable"),
    ({'backend': 'engine', 'model': '/no/such/model'},
     r"config.data.rewrite.model='/no/such/model': /no/such/model: no such directory"),
    ({'keep_label_of': '/no/such/run'},
     r"config.data.rewrite.keep_label_of='/no/such/run': no such directory"),
    ({'keep_label_of': 'teacher'},
     r"config.data.rewrite.keep_label_of='teacher': only a distillation has a teacher"),
])
def test_a_generator_or_filter_that_is_not_there_is_a_one_line_error(rewrite, error, tmp_path):
  augment = AugmentConfig.from_config({'augment': ('paraphrase:0.5',), 'rewrite': {
      'model': 'some-model', 'base_url': _closed_port_url(), **rewrite}})
  with pytest.raises(ValueError, match=error) as raised:
    rewrites.training_rewrites(['my card is lost'], augment, seed=0, workdir=str(tmp_path),
                               mesh=configlib.mesh('data'), label_batch=8)
  assert '\n' not in str(raised.value)
  assert not os.path.exists(os.path.join(tmp_path, 'augment', 'kept.json'))


def test_an_endpoint_that_fails_every_request_stops_the_run_and_keeps_nothing(stub, tmp_path):
  stub.script(Answer(status=503), Answer(status=503))
  augment = AugmentConfig.from_config({'augment': ('paraphrase:0.5',), 'augment_copies': 2,
                                       'rewrite': {'base_url': stub.base_url, 'model': 'm'}})
  with pytest.raises(ValueError, match=r"config.data.rewrite.base_url='http://127.0.0.1:\d+/v1': "
                                       r'all 2 requests failed \(the last: HTTP 503'):
    rewrites.training_rewrites(['my card is lost'], augment, seed=0, workdir=str(tmp_path),
                               mesh=configlib.mesh('data'), label_batch=8)
  assert not os.path.exists(os.path.join(tmp_path, 'augment', 'kept.json'))

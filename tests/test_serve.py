"""The serve stage: an OpenAI-compatible HTTP server, spoken to over loopback with urllib.

Properties: a completion over HTTP is the library's completion of the same prompt
(`TextGenerator.complete`); concurrent requests are decoded together (the engine's `max_rows`)
and each still gets its own answer; a chat prompt is the checkpoint's chat template as
transformers renders it; a classification is `Classifier.predict`'s; bad requests get a 4xx in
OpenAI's error shape whose message names the field; a full queue answers 503 with Retry-After;
and the stage, run as `main.py` in a subprocess, finishes a request in flight on SIGTERM or
SIGINT, stops accepting and exits 0.

One tiny random Llama (WordLevel tokenizer, a small chat template) and one tiny GPT-2
classifier, each served once per module on one device at the `tiny` limits of
configs/serve.py, which the subprocess shares (and so the compilation cache).
"""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tokenizers
import uvicorn

import tolerances
from conftest import REPO, load_config
from llmopt_jax import sharding, configlib
from llmopt_jax.inference import classify, loading
from llmopt_jax.inference.batcher import GenerationBatcher
from llmopt_jax.inference.sampling import SamplingParams
from llmopt_jax.inference.server import Served, create_app
from llmopt_jax.stages import serve

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TIMEOUT_S = 240
SPECIALS = ['<pad>', '<s>', '</s>', '<unk>']
WORDS = ['system', 'user', 'assistant', ':', 'hello', 'there', 'how', 'are', 'you', 'today']
V = 64
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
            "{{ eos_token }} {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")
LABELS = ('negative', 'neutral', 'positive')


def _words(n: int, seed: int) -> str:
  """A prompt of `n` words (one token each) drawn from the vocabulary's plain words."""
  rng = np.random.default_rng(seed)
  return ' '.join(f'w{i}' for i in rng.integers(0, V - len(SPECIALS) - len(WORDS), n))


def _save_checkpoint(directory, cls: str, config) -> str:
  """A tiny random transformers model `cls` with the WordLevel tokenizer and the chat
  template."""
  vocab = SPECIALS + WORDS
  vocab += [f'w{i}' for i in range(V - len(vocab))]
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {t: i for i, t in enumerate(vocab)}, unk_token='<unk>'))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tokenizer.add_special_tokens(SPECIALS)
  tokenizer.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
    json.dump({'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<s>',
               'eos_token': '</s>', 'pad_token': '<pad>', 'unk_token': '<unk>',
               'chat_template': TEMPLATE}, f)
  torch.manual_seed(0)
  model = getattr(transformers, cls)(config).eval()
  with torch.no_grad():  # HF initialises gains to 1 and biases to 0: perturb every tensor
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory, safe_serialization=True)
  return str(directory)


@pytest.fixture(scope='module')
def lm_dir(tmp_path_factory) -> str:
  config = transformers.LlamaConfig(
      vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
      eos_token_id=2)
  return _save_checkpoint(tmp_path_factory.mktemp('lm'), 'LlamaForCausalLM', config)


def _config(model: str, **engine):
  config = load_config('serve', f'tiny,model={model}')
  config.sampling.temperature = 0.0  # greedy unless a request asks otherwise
  config.engine.update(engine)
  return config


class _Running:
  """A served model on a uvicorn thread at 127.0.0.1:<free port>."""

  def __init__(self, served: Served, start_worker: bool = True):
    self.served = served
    listening = serve.bind('127.0.0.1', 0)
    self.url = f'http://127.0.0.1:{listening.getsockname()[1]}'
    self.server = uvicorn.Server(uvicorn.Config(create_app(served), log_level='warning'))
    self.thread = threading.Thread(target=self.server.run, kwargs={'sockets': [listening]},
                                   daemon=True)
    if start_worker:
      served.batcher.start()
    self.thread.start()
    deadline = time.monotonic() + 30
    while not self.server.started:
      assert time.monotonic() < deadline, 'uvicorn did not start'
      time.sleep(0.01)

  def stop(self) -> None:
    self.server.should_exit = True
    self.thread.join(30)
    self.served.batcher.stop()


def _serving(config) -> _Running:
  """The model of `config` served as the stage serves it, warmed up."""
  served = serve.build(config, serve._checked(config))
  served.batcher.warm_up()
  return _Running(served)


@pytest.fixture(scope='module')
def lm(lm_dir):
  running = _serving(_config(lm_dir))
  yield running
  running.stop()


def _call(url: str, body=None, method: str | None = None, timeout: float = 60
          ) -> tuple[int, dict, dict]:
  """(status, JSON body, headers) of one HTTP request; a dict body is sent as JSON, bytes as
  they are."""
  data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
  request = urllib.request.Request(url, data=data, method=method,
                                   headers={'Content-Type': 'application/json'})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return response.status, json.loads(response.read()), dict(response.headers)
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read()), dict(e.headers)


def _library(running: _Running, prompts, **params):
  """`TextGenerator.complete` on the served engine (its worker idles meanwhile)."""
  generator = running.served.batcher.generator
  return generator.complete(prompts, [SamplingParams(**params)] * len(prompts))


# Prompts of 17-32 tokens fill the slots' prompt bucket (32), and max_tokens 16 their output
# bucket, so the library's own continuous batching runs the server's programs.
PROMPTS = [_words(17 + 2 * i, seed=i) for i in range(8)]


SETTINGS = {'greedy': {'temperature': 0.0},
            'sampled': {'temperature': 0.8, 'top_p': 0.9, 'top_k': 5, 'seed': 7},
            'stop_string': {'temperature': 0.0}}


@pytest.mark.parametrize('settings', sorted(SETTINGS))
def test_completion_over_http_is_the_librarys(lm, settings):
  params = dict(SETTINGS[settings])
  if settings == 'stop_string':  # a word from the middle of the greedy completion
    words = _library(lm, PROMPTS[:1], max_new_tokens=16, **params)[0].text.split()
    assert len(words) > 2, words
    params['stop'] = [words[len(words) // 2]]
  status, body, _ = _call(f'{lm.url}/v1/completions', {
      'model': 'anything', 'prompt': PROMPTS[0], 'max_tokens': 16, 'logprobs': 1, **params})
  assert status == 200, body
  [want] = _library(lm, PROMPTS[:1], max_new_tokens=16, **params)
  [choice] = body['choices']
  assert (body['object'], body['model']) == ('text_completion', lm.served.name)
  assert (choice['text'], choice['finish_reason']) == (want.text, want.finish_reason)
  if 'stop' in params:
    assert want.finish_reason == 'stop' and params['stop'][0] not in want.text
  assert choice['logprobs']['tokens'] == [
      lm.served.batcher.generator.tokenizer.decode([t]) for t in want.tokens]
  # Both run the same programs (the same buckets); the bound covers any summation order.
  cfg = lm.served.batcher.generator.engine.config
  tolerances.assert_close(choice['logprobs']['token_logprobs'], want.token_logprobs,
                          tolerances.sum_tolerance(tolerances.forward_terms(cfg, 48) + V,
                                                   1 + max(map(abs, want.token_logprobs))))
  assert body['usage'] == {'prompt_tokens': 17, 'completion_tokens': len(want.tokens),
                           'total_tokens': 17 + len(want.tokens)}


def test_concurrent_requests_are_decoded_together(lm):
  """Eight clients at once: every answer is the library's for its prompt, and the engine
  decoded more than one of them in the same rows (at most its 4 slots)."""
  before = _call(f'{lm.url}/v1/stats')[1]
  assert before['max_rows'] <= 1, before  # no other test decodes rows together on this engine
  barrier = threading.Barrier(len(PROMPTS))

  def ask(prompt):
    barrier.wait()
    return _call(f'{lm.url}/v1/completions',
                 {'prompt': prompt, 'max_tokens': 16, 'temperature': 0})
  with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
    answers = list(pool.map(ask, PROMPTS))
  status, stats, _ = _call(f'{lm.url}/v1/stats')
  assert [a[0] for a in answers] == [200] * len(PROMPTS), answers
  assert status == 200 and 1 < stats['max_rows'] <= 4, stats
  assert stats['completed'] - before['completed'] == len(PROMPTS), (before, stats)
  assert (stats['queue_depth'], stats['running']) == (0, 0), stats
  want = _library(lm, PROMPTS, max_new_tokens=16)
  assert [a[1]['choices'][0]['text'] for a in answers] == [w.text for w in want]


def test_chat_prompt_is_the_checkpoints_template(lm, lm_dir):
  messages = [{'role': 'system', 'content': 'hello there'},
              {'role': 'user', 'content': [{'type': 'text', 'text': 'how are you today'}]}]
  status, body, _ = _call(f'{lm.url}/v1/chat/completions',
                          {'messages': messages, 'max_completion_tokens': 8, 'temperature': 0})
  assert status == 200, body
  reference = transformers.AutoTokenizer.from_pretrained(lm_dir)
  rendered = reference.apply_chat_template(
      [{'role': 'system', 'content': 'hello there'},
       {'role': 'user', 'content': 'how are you today'}],
      tokenize=False, add_generation_prompt=True)
  ids = reference(rendered, add_special_tokens=False)['input_ids']
  assert body['usage']['prompt_tokens'] == len(ids)
  [choice] = body['choices']
  assert body['object'] == 'chat.completion' and choice['message']['role'] == 'assistant'
  status, plain, _ = _call(f'{lm.url}/v1/completions',
                           {'prompt': rendered, 'max_tokens': 8, 'temperature': 0})
  assert status == 200 and plain['choices'][0]['text'] == choice['message']['content']


def test_the_projects_chat_client_reads_the_servers_answers(lm):
  """The client the sweep advisor and the rewriters use (openai_client.ChatClient) speaks to
  this server: it finds it, and its answer is the server's own chat completion."""
  from llmopt_jax.openai_client import ChatClient
  _, models, _ = _call(f'{lm.url}/v1/models')
  client = ChatClient(f'{lm.url}/v1', models['data'][0]['id'], temperature=0.0, max_tokens=8)
  client.check_reachable()
  messages = [{'role': 'user', 'content': 'how are you today'}]
  answer = client.chat(messages)
  status, body, _ = _call(f'{lm.url}/v1/chat/completions',
                          {'messages': messages, 'max_tokens': 8, 'temperature': 0.0})
  assert status == 200 and answer.text == body['choices'][0]['message']['content']
  assert answer.usage['total_tokens'] == body['usage']['total_tokens']


TOO_LONG = _words(40, seed=9)
BAD_REQUESTS = {  # name: (endpoint, body, status, the field the message must name)
    'bad_json': ('completions', b'{"prompt": "w1",', 400, 'JSON'),
    'not_an_object': ('completions', b'[1, 2]', 400, 'object'),
    'missing_prompt': ('completions', {'max_tokens': 4}, 400, 'prompt'),
    'negative_temperature': ('completions', {'prompt': 'w1', 'temperature': -1}, 400,
                             'temperature'),
    'temperature_not_a_number': ('completions', {'prompt': 'w1', 'temperature': 'hot'}, 400,
                                 'temperature'),
    'top_p_zero': ('completions', {'prompt': 'w1', 'top_p': 0}, 400, 'top_p'),
    'prompt_too_long': ('completions', {'prompt': TOO_LONG}, 400, 'prompt'),
    'max_tokens_too_large': ('completions', {'prompt': 'w1', 'max_tokens': 1000}, 400,
                             'max_tokens'),
    'n_2': ('completions', {'prompt': 'w1', 'n': 2}, 400, 'n'),
    'stream': ('completions', {'prompt': 'w1', 'stream': True}, 400, 'stream'),
    'empty_prompt_list': ('completions', {'prompt': []}, 400, 'prompt'),
    'message_without_role': ('chat/completions', {'messages': [{'content': 'hi'}]}, 400,
                             'messages.0.role'),
    'no_messages': ('chat/completions', {'messages': []}, 400, 'messages'),
    'classify_on_a_language_model': ('classify', {'input': 'w1'}, 400, 'classifier'),
    'unknown_endpoint': ('embeddings', {'input': 'w1'}, 404, 'Not Found'),
}


@pytest.mark.parametrize('case', sorted(BAD_REQUESTS))
def test_bad_request_gets_a_4xx_naming_the_field(lm, case):
  endpoint, body, want_status, named = BAD_REQUESTS[case]
  status, answer, _ = _call(f'{lm.url}/v1/{endpoint}', body, method='POST')
  error = answer['error']
  assert status == want_status, answer
  assert named in error['message'] and '\n' not in error['message'], error
  assert error['type'] == 'invalid_request_error', error


def test_full_queue_answers_503_with_retry_after(lm):
  """A queue of one on an idle worker: of three requests at once, one waits and two are
  refused at once; started, the worker answers the one that waited."""
  generator = lm.served.batcher.generator
  held = _Running(Served('held', GenerationBatcher(generator, queue_size=1),
                         defaults=lm.served.defaults), start_worker=False)
  try:
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
      calls = [pool.submit(_call, f'{held.url}/v1/completions', {'prompt': p, 'max_tokens': 4})
               for p in PROMPTS[:3]]
      deadline = time.monotonic() + 30
      while sum(c.done() for c in calls) < 2:
        assert time.monotonic() < deadline, 'no request was refused'
        time.sleep(0.01)
      refused = [c.result() for c in calls if c.done()]
      assert [r[0] for r in refused] == [503, 503], refused
      assert all(r[2]['retry-after'] == '1' and 'busy' in r[1]['error']['message']
                 for r in refused), refused
      held.served.batcher.start()
      [waited] = [c.result() for c in calls if c not in refused and c.result()[0] == 200]
  finally:
    held.stop()
  assert waited[1]['choices'][0]['finish_reason'] in ('stop', 'length')


@pytest.fixture(scope='module')
def classifier(tmp_path_factory):
  config = transformers.GPT2Config(
      vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32, pad_token_id=0,
      bos_token_id=1, eos_token_id=2, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)))
  directory = _save_checkpoint(tmp_path_factory.mktemp('classifier'),
                               'GPT2ForSequenceClassification', config)
  running = _serving(_config(directory, max_batch=8))  # a multiple of the 8 devices
  yield directory, running
  running.stop()


def test_classify_is_the_classifiers_prediction(classifier):
  directory, running = classifier
  texts = [_words(n, seed=n) for n in (3, 20, 7)]
  status, body, _ = _call(f'{running.url}/v1/classify', {'input': texts})
  assert status == 200, body
  mesh, rules = sharding.from_config(configlib.mesh('data'))
  model = loading.load(directory, mesh, rules)
  want = classify.Classifier(model, mesh, rules, batch_size=8).predict(texts)
  got = np.array([[row['probabilities'][label] for label in LABELS] for row in body['data']])
  # Probabilities move by at most twice their logits' rounding (the logits are below 1).
  terms = tolerances.forward_terms(model.config, model.max_len) + len(LABELS)
  tolerances.assert_close(got, want, 2 * tolerances.sum_tolerance(terms, 1.0))
  assert [row['label'] for row in body['data']] == [LABELS[i] for i in want.argmax(1)]
  status, body, _ = _call(f'{running.url}/v1/completions', {'prompt': 'w1'})
  assert status == 400 and 'classifier' in body['error']['message'], body


# ---- The stage, in a subprocess -----------------------------------------------------------------

@pytest.mark.parametrize('stop_signal', [signal.SIGTERM, signal.SIGINT], ids=['TERM', 'INT'])
def test_stage_finishes_in_flight_requests_and_exits_0_on_signal(lm_dir, tmp_path,
                                                                 stop_signal):
  workdir = tmp_path / 'serve'
  process = subprocess.Popen(
      [sys.executable, 'main.py', f'--config=configs/serve.py:tiny,model={lm_dir}',
       '--config.serve.port=0', '--config.serve.warm_up=False', f'--workdir={workdir}'],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  try:
    address = workdir / serve.SERVER_JSON
    deadline = time.monotonic() + TIMEOUT_S
    while not address.exists():
      assert process.poll() is None, process.communicate()[0]
      assert time.monotonic() < deadline, 'no server.json'
      time.sleep(0.1)
    url = json.loads(address.read_text())['url']
    assert _call(f'{url}/health')[:2] == (200, {'status': 'ok'})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      in_flight = pool.submit(_call, f'{url}/v1/completions',
                              {'prompt': PROMPTS[0], 'max_tokens': 16, 'temperature': 0})
      # Without warm-up the request compiles its programs first: it is still in flight when
      # the signal arrives.
      while (at_signal := _call(f'{url}/v1/stats')[1])['requests'] < 1:
        time.sleep(0.01)
      process.send_signal(stop_signal)
      status, body, _ = in_flight.result(timeout=TIMEOUT_S)
    output = process.communicate(timeout=TIMEOUT_S)[0]
  finally:
    process.kill()
  assert at_signal['completed'] == 0, at_signal
  assert status == 200 and body['choices'][0]['finish_reason'] in ('stop', 'length'), body
  assert process.returncode == 0, output
  assert 'Traceback' not in output and 'Stopped serving' in output, output
  assert not address.exists()
  with pytest.raises(urllib.error.URLError):
    _call(f'{url}/health', timeout=5)

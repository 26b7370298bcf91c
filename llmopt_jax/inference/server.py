"""An OpenAI-compatible HTTP API over one model: `create_app(served)` -> a FastAPI app.

Endpoints (JSON in, JSON out; shapes as OpenAI's, so its clients and SDKs work unchanged):
  POST /v1/completions        {prompt: str | [str], max_tokens, temperature, top_p, top_k (an
                              extension), seed, stop, logprobs} -> a text_completion
  POST /v1/chat/completions   {messages: [{role, content}], max_tokens | max_completion_tokens,
                              temperature, top_p, top_k, seed, stop, logprobs: bool}
                              -> a chat.completion; the prompt is the model's own chat template
  POST /v1/classify           {input: str | [str]} -> {data: [{index, label, probabilities}]}
  GET  /v1/models, /health, /v1/stats (counters: requests, completed, rejected, queue_depth,
                              running, and the engine's compiles, prefills, max_rows, ...)
A language model serves the first two, a classifier the third; the others answer 400. Any
`model` name is accepted: the server has one model, named in every response.

Request bodies and the error shape are `openai_api.py`'s. Requests are not computed here:
each becomes a job on the batcher's bounded line (`inference/batcher.py`), and the handler
awaits its future, so concurrent requests are computed together.

Not supported (a 400 that says so): `stream` (answers come whole), `n` > 1, `echo`,
`best_of`, `suffix`, penalties and `logit_bias`. `logprobs` gives each chosen token's
log-probability, not the top alternatives. A request without a `seed` gets a fresh one unless
the server's default seed is fixed (so repeated requests at temperature > 0 differ, as
OpenAI's do). A client that goes away before its turn is skipped; a running row finishes.

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and one line that
names the field: 400 for bad JSON, a missing field, a bad value or too many tokens; 503 with
Retry-After when the line is full; 500 only for a failure of the server itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import fastapi
import numpy as np

from llmopt_jax.inference.batcher import (ClassificationBatcher, GenerationBatcher, QueueFull,
                                          Stopped)
from llmopt_jax.inference.chat import ChatTemplate, TemplateError
from llmopt_jax.inference.openai_api import (ApiError, ChatMessage, ChatRequest,
                                             ClassifyRequest, CompletionRequest, SamplingFields,
                                             install_error_handlers)
from llmopt_jax.inference.sampling import SamplingParams
from llmopt_jax.inference.text import Completion

RETRY_AFTER_S = 1
# Request fields this server cannot honour, with the one value it accepts.
UNSUPPORTED = {'stream': False, 'n': 1, 'echo': False, 'best_of': 1, 'suffix': None,
               'presence_penalty': 0, 'frequency_penalty': 0, 'logit_bias': None}


@dataclasses.dataclass(frozen=True)
class Served:
  """What the app serves: the model's name, its batcher, its chat template (None: the model
  has none) and the sampling a request gets for the fields it leaves out (seed < 0: a fresh
  one per request)."""
  name: str
  batcher: GenerationBatcher | ClassificationBatcher
  chat: ChatTemplate | None = None
  defaults: SamplingParams = dataclasses.field(default_factory=SamplingParams)
  default_seed: int = -1


def create_app(served: Served) -> fastapi.FastAPI:
  app = fastapi.FastAPI(title=f'llmopt_jax: {served.name}')
  install_error_handlers(app)
  started = int(time.time())

  @app.get('/health')
  async def health() -> dict[str, str]:
    return {'status': 'ok'}

  @app.get('/v1/models')
  async def models() -> dict[str, Any]:
    return {'object': 'list', 'data': [{'id': served.name, 'object': 'model',
                                        'created': started, 'owned_by': 'llmopt_jax'}]}

  @app.get('/v1/stats')
  async def stats() -> dict[str, Any]:
    return {'model': served.name, **served.batcher.stats()}

  @app.post('/v1/completions')
  async def completions(request: CompletionRequest) -> dict[str, Any]:
    return await _complete(served, request)

  @app.post('/v1/chat/completions')
  async def chat_completions(request: ChatRequest) -> dict[str, Any]:
    return await _chat(served, request)

  @app.post('/v1/classify')
  async def classify(request: ClassifyRequest) -> dict[str, Any]:
    return await _classify(served, request)

  return app


async def _complete(served: Served, request: CompletionRequest) -> dict[str, Any]:
  batcher = _generation(served, '/v1/completions')
  prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
  _check_count('prompt', len(prompts), batcher.line.capacity)
  params = _sampling(served, request, request.max_tokens, 'max_tokens')
  jobs = [(p, _encode(batcher, p, params, 'prompt'), params) for p in prompts]
  done = await _answers(_submit(batcher, jobs))
  choices = [{'index': i, 'text': c.text, 'finish_reason': c.finish_reason,
              'logprobs': None if request.logprobs is None else {
                  'tokens': _token_texts(batcher, c), 'token_logprobs': list(c.token_logprobs),
                  'top_logprobs': None}} for i, c in enumerate(done)]
  return _response(served, 'cmpl', 'text_completion', choices, done)


async def _chat(served: Served, request: ChatRequest) -> dict[str, Any]:
  batcher = _generation(served, '/v1/chat/completions')
  prompt = _render(served, request.messages)
  field = 'max_completion_tokens' if request.max_completion_tokens is not None else 'max_tokens'
  params = _sampling(served, request, getattr(request, field), field)
  job = (prompt, _encode(batcher, prompt, params, 'messages'), params)
  [c] = await _answers(_submit(batcher, [job]))
  logprobs = None if not request.logprobs else {'content': [
      {'token': t, 'logprob': p, 'bytes': list(t.encode()), 'top_logprobs': []}
      for t, p in zip(_token_texts(batcher, c), c.token_logprobs, strict=True)]}
  choice = {'index': 0, 'message': {'role': 'assistant', 'content': c.text},
            'finish_reason': c.finish_reason, 'logprobs': logprobs}
  return _response(served, 'chatcmpl', 'chat.completion', [choice], [c])


async def _classify(served: Served, request: ClassifyRequest) -> dict[str, Any]:
  batcher = served.batcher
  if not isinstance(batcher, ClassificationBatcher):
    raise ApiError(400, f'{served.name} is a language model; /v1/classify needs a classifier '
                   f'(use /v1/completions or /v1/chat/completions)', 'model')
  texts = [request.input] if isinstance(request.input, str) else request.input
  _check_count('input', len(texts), batcher.line.capacity)
  rows = await _answers(_submit(batcher, texts))
  data = [{'index': i, 'label': batcher.labels[int(np.argmax(p))],
           'probabilities': dict(zip(batcher.labels, map(float, p), strict=True))}
          for i, p in enumerate(rows)]
  return {'object': 'list', 'model': served.name, 'data': data}


def _generation(served: Served, endpoint: str) -> GenerationBatcher:
  if not isinstance(served.batcher, GenerationBatcher):
    raise ApiError(400, f'{served.name} is a classifier; {endpoint} needs a language model '
                   f'(use /v1/classify)', 'model')
  return served.batcher


def _check_count(field: str, count: int, capacity: int) -> None:
  if count == 0:
    raise ApiError(400, f'{field}: an empty list; give at least one', field)
  if count > capacity:
    raise ApiError(400, f'{field}: {count} items in one request; this server queues at most '
                   f'{capacity} (config.engine.queue_size)', field)


def _sampling(served: Served, request: SamplingFields, max_tokens: int | None,
              max_tokens_field: str) -> SamplingParams:
  """The request's sampling settings over the server's defaults; a bad value is a 400 naming
  the request's field."""
  sent = request.model_dump()
  for field, allowed in UNSUPPORTED.items():
    value = sent.get(field)
    if value not in (None, allowed) and value != {}:
      raise ApiError(400, f'{field}={json.dumps(value)} is not supported by this server; leave '
                     f'it out or set {json.dumps(allowed)}', field)
  given = {'max_new_tokens': max_tokens, 'temperature': request.temperature,
           'top_p': request.top_p, 'top_k': request.top_k, 'seed': request.seed,
           'stop': [request.stop] if isinstance(request.stop, str) else request.stop}
  fields = {k: v for k, v in given.items() if v is not None}
  if 'seed' not in fields:
    fields['seed'] = (served.default_seed if served.default_seed >= 0
                      else random.SystemRandom().randrange(2**31))
  try:
    params = dataclasses.replace(served.defaults, **fields)
  except ValueError as e:
    field = re.match(r'sampling\.(\w+)', str(e))
    name = field and {'max_new_tokens': max_tokens_field}.get(field[1], field[1])
    raise ApiError(400, re.sub(r'^sampling\.\w+', name, str(e)) if name else str(e),
                   name) from None
  limit = served.batcher.generator.engine.max_new_tokens
  if params.max_new_tokens > limit:
    raise ApiError(400, f'{max_tokens_field}={params.max_new_tokens} exceeds this server\'s '
                   f'limit of {limit} new tokens (config.engine.max_new_tokens)',
                   max_tokens_field, 'context_length_exceeded')
  return params


def _encode(batcher: GenerationBatcher, prompt: str, params: SamplingParams,
            field: str) -> np.ndarray:
  try:
    return batcher.generator.encode(prompt, params)
  except ValueError as e:
    raise ApiError(400, f'{field}: {e}', field, 'context_length_exceeded') from None


def _render(served: Served, messages: Sequence[ChatMessage]) -> str:
  if served.chat is None:
    raise ApiError(400, f'{served.name} has no chat template (no chat_template in its '
                   f'tokenizer_config.json, no chat_template.jinja); send a plain prompt to '
                   f'/v1/completions', 'messages')
  try:
    return served.chat.render([_message_dict(m, i) for i, m in enumerate(messages)])
  except TemplateError as e:
    raise ApiError(400, f'messages: {e}', 'messages') from None


def _message_dict(message: ChatMessage, index: int) -> dict[str, Any]:
  """A message for the template, OpenAI's content parts ([{type: text, text}]) joined."""
  content = message.content
  if isinstance(content, list):
    if any(part.get('type') != 'text' or not isinstance(part.get('text'), str)
           for part in content):
      raise ApiError(400, f'messages.{index}.content: only text parts ({{"type": "text", '
                     f'"text": ...}}) are supported', 'messages')
    content = ''.join(part['text'] for part in content)
  return {**message.model_dump(exclude_none=True), 'content': content or ''}


def _submit(batcher: GenerationBatcher | ClassificationBatcher, jobs: list) -> list[Future]:
  try:
    return batcher.submit(jobs)
  except QueueFull as e:
    raise ApiError(503, str(e), code='queue_full',
                   headers={'Retry-After': str(RETRY_AFTER_S)}) from None


async def _answers(futures: list[Future]) -> list[Any]:
  try:
    return await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
  except Stopped as e:
    raise ApiError(503, str(e)) from None


def _token_texts(batcher: GenerationBatcher, completion: Completion) -> list[str]:
  return [batcher.generator.tokenizer.decode([t]) for t in completion.tokens]


def _response(served: Served, prefix: str, kind: str, choices: list[dict[str, Any]],
              done: Sequence[Completion]) -> dict[str, Any]:
  prompt_tokens = sum(c.prompt_tokens for c in done)
  completion_tokens = sum(len(c.tokens) for c in done)
  return {'id': f'{prefix}-{uuid.uuid4().hex}', 'object': kind, 'created': int(time.time()),
          'model': served.name, 'choices': choices,
          'usage': {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
                    'total_tokens': prompt_tokens + completion_tokens}}

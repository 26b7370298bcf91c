"""A real HTTP server on loopback that speaks the OpenAI chat-completions API, for tests.

It stands in for a hosted API, a vLLM or an Ollama server: a real socket, real HTTP, so the
client under test runs its own request, header, timeout and error paths, with no mock of
urllib. What it answers is scripted: `POST /v1/chat/completions` returns the next `Answer` of
the script, in order (its text, after an optional delay that provokes a client timeout, or an
HTTP error status), and records every request (its JSON body and its headers) so a test can
read the prompt the client really sent. `GET /v1/models` lists the one model. Once the script
is used up, each further request gets HTTP 500 ('no scripted answer left'), so a client that
asks more often than the test planned fails loudly instead of hanging.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading
import time
from typing import Any

MODEL = 'stub-model'


@dataclasses.dataclass(frozen=True)
class Answer:
  """One scripted reply: `text` as the assistant message, sent after `delay_s` seconds, or an
  HTTP error `status` (>= 400) with an OpenAI-style error body."""
  text: str = ''
  delay_s: float = 0.0
  status: int = 200


@dataclasses.dataclass(frozen=True)
class Request:
  """One request the server received: its path, JSON body and headers (names lower-cased)."""
  path: str
  body: dict[str, Any]
  headers: dict[str, str]

  @property
  def messages(self) -> list[dict[str, Any]]:
    return self.body.get('messages', [])

  @property
  def text(self) -> str:
    """Every message's content, joined: what the model was shown."""
    return '\n'.join(str(m.get('content', '')) for m in self.messages)


class OpenAIStub:
  """The server, on 127.0.0.1 at a free port, served by a daemon thread until `stop()`."""

  def __init__(self, model: str = MODEL) -> None:
    self.model = model
    self.requests: list[Request] = []  # chat-completion requests, in arrival order
    self.model_lists = 0               # GET /v1/models requests served
    self._script: list[Answer] = []
    self._lock = threading.Lock()
    self._stopped = False
    self._server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _handler(self))
    self._server.daemon_threads = True  # a handler still sleeping out a delay never blocks exit
    self._thread = threading.Thread(target=self._server.serve_forever,
                                    kwargs={'poll_interval': 0.05}, daemon=True)
    self._thread.start()

  @property
  def base_url(self) -> str:
    return f'http://127.0.0.1:{self._server.server_address[1]}/v1'

  def script(self, *answers: Answer | str) -> None:
    """Appends answers (a plain string is an immediate answer with that text)."""
    with self._lock:
      self._script.extend(a if isinstance(a, Answer) else Answer(a) for a in answers)

  @property
  def left(self) -> int:
    """Scripted answers not yet given."""
    with self._lock:
      return len(self._script)

  def stop(self) -> None:
    """Stops serving and closes the port (a later request is refused); idempotent."""
    if self._stopped:
      return
    self._stopped = True
    self._server.shutdown()
    self._server.server_close()
    self._thread.join(timeout=5)

  def _next(self, request: Request) -> Answer:
    with self._lock:
      self.requests.append(request)
      if not self._script:
        return Answer(status=500, text='no scripted answer left')
      return self._script.pop(0)

  def _completion(self, answer: Answer, body: dict[str, Any]) -> dict[str, Any]:
    prompt_words = sum(len(str(m.get('content', '')).split()) for m in body.get('messages', []))
    completion_words = len(answer.text.split())
    return {
        'id': f'chatcmpl-{len(self.requests)}', 'object': 'chat.completion',
        'created': int(time.time()), 'model': body.get('model', self.model),
        'choices': [{'index': 0, 'finish_reason': 'stop',
                     'message': {'role': 'assistant', 'content': answer.text}}],
        'usage': {'prompt_tokens': prompt_words, 'completion_tokens': completion_words,
                  'total_tokens': prompt_words + completion_words}}


def _handler(stub: OpenAIStub) -> type[http.server.BaseHTTPRequestHandler]:
  """The request handler class bound to `stub` (http.server makes one instance per request)."""

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def do_GET(self) -> None:  # noqa: N802  (http.server's name)
      if self.path.rstrip('/') != '/v1/models':
        self._send(404, _error(f'no route GET {self.path}'))
        return
      with stub._lock:
        stub.model_lists += 1
      self._send(200, {'object': 'list',
                       'data': [{'id': stub.model, 'object': 'model', 'owned_by': 'stub'}]})

    def do_POST(self) -> None:  # noqa: N802  (http.server's name)
      length = int(self.headers.get('Content-Length', 0))
      raw = self.rfile.read(length)
      if self.path.rstrip('/') != '/v1/chat/completions':
        self._send(404, _error(f'no route POST {self.path}'))
        return
      try:
        body = json.loads(raw)
      except json.JSONDecodeError as e:
        self._send(400, _error(f'request body is not JSON: {e}'))
        return
      headers = {k.lower(): v for k, v in self.headers.items()}
      answer = stub._next(Request(self.path, body, headers))
      if answer.delay_s:
        time.sleep(answer.delay_s)
      if answer.status >= 400:
        self._send(answer.status, _error(answer.text or f'HTTP {answer.status}'))
      else:
        self._send(200, stub._completion(answer, body))

    def _send(self, status: int, payload: dict[str, Any]) -> None:
      data = json.dumps(payload).encode()
      try:
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)
      except (BrokenPipeError, ConnectionResetError):  # the client timed out and hung up
        pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (base's name)
      return None  # quiet: pytest output is for failures

  return Handler


def _error(message: str) -> dict[str, Any]:
  return {'error': {'message': message, 'type': 'stub_error', 'code': None}}

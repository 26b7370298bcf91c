"""A client of the OpenAI chat-completions protocol, the one way the project talks to an LLM.

Any server that speaks it works: a hosted API, a local vLLM or Ollama server, or this
project's own `serve` stage. The client is the standard library's urllib (no SDK to pin):
one POST to `<base_url>/chat/completions` per call, JSON in and out.

The API key is read from the environment variable the config names (`api_key_env`), at the
moment of the request, and goes into the Authorization header only: it is never a config
value, never logged, never part of what a caller records (the messages and the answer).

Failures of the transport (a timeout, a refused connection, an HTTP error status, a body
without an answer) raise `ChatError` with one line saying what happened, so the caller can
retry or fall back; a server that cannot be reached at all when a run starts is a config
error (`check_reachable`), naming the base_url field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any


class ChatError(Exception):
  """The server gave no answer: timeout, connection, HTTP status or a malformed body."""


@dataclasses.dataclass(frozen=True)
class ChatAnswer:
  text: str
  seconds: float
  usage: dict  # the server's token counts, as it reports them ({} if it does not)


@dataclasses.dataclass(frozen=True)
class ChatClient:
  base_url: str                 # e.g. http://localhost:8000/v1
  model: str
  api_key_env: str = ''         # the environment variable holding the key; '' = no key
  timeout_s: float = 60.0
  temperature: float = 0.7
  max_tokens: int = 1024
  json_mode: bool = False       # ask for response_format json_object (OpenAI, vLLM, Ollama)
  field: str = 'config.llm'     # the config section, for error messages

  def __post_init__(self) -> None:
    if not self.base_url.startswith(('http://', 'https://')):
      raise ValueError(f'{self.field}.base_url={self.base_url!r}: an http(s) URL such as '
                       f'http://localhost:8000/v1')
    if self.api_key_env and self.api_key_env not in os.environ:
      raise ValueError(f'{self.field}.api_key_env={self.api_key_env!r}: no such environment '
                       f'variable is set (export it with the API key, or set the field to '
                       f"'' for a server without keys)")

  def chat(self, messages: list[dict[str, str]]) -> ChatAnswer:
    """The model's answer to `messages` (role/content dicts)."""
    body = {'model': self.model, 'messages': messages, 'temperature': self.temperature,
            'max_tokens': self.max_tokens}
    if self.json_mode:
      body['response_format'] = {'type': 'json_object'}
    started = time.perf_counter()
    reply = self._request('chat/completions', body)
    try:
      text = reply['choices'][0]['message']['content']
    except (KeyError, IndexError, TypeError):
      raise ChatError(f'the answer has no choices[0].message.content: {str(reply)[:200]}'
                      ) from None
    if not isinstance(text, str):
      text = '' if text is None else json.dumps(text)
    usage = reply.get('usage') if isinstance(reply.get('usage'), dict) else {}
    return ChatAnswer(text, time.perf_counter() - started, usage)

  def check_reachable(self) -> None:
    """Raises a one-line config error when nothing answers at base_url (GET /models)."""
    try:
      self._request('models', None, timeout_s=min(self.timeout_s, 10.0))
    except ChatError as e:
      raise ValueError(f'{self.field}.base_url={self.base_url!r}: no OpenAI-compatible server '
                       f'answers there ({e})') from None

  def _request(self, path: str, body: dict[str, Any] | None,
               timeout_s: float | None = None) -> dict[str, Any]:
    url = f'{self.base_url.rstrip("/")}/{path}'
    headers = {'Content-Type': 'application/json', 'Accept': 'application/json'}
    key = os.environ.get(self.api_key_env, '') if self.api_key_env else ''
    if key:
      headers['Authorization'] = f'Bearer {key}'
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers,
                                     method='GET' if body is None else 'POST')
    timeout = self.timeout_s if timeout_s is None else timeout_s
    try:
      with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http(s) only)
        return json.loads(response.read().decode())
    except urllib.error.HTTPError as e:
      raise ChatError(f'HTTP {e.code} from {url}: {_error_text(e)}') from None
    except TimeoutError:
      raise ChatError(f'timed out after {timeout:g} s') from None
    except urllib.error.URLError as e:
      if isinstance(e.reason, TimeoutError):
        raise ChatError(f'timed out after {timeout:g} s') from None
      raise ChatError(f'cannot reach {url}: {e.reason}') from None
    except (json.JSONDecodeError, UnicodeDecodeError, ConnectionError) as e:
      raise ChatError(f'unreadable answer from {url}: {type(e).__name__}: {e}') from None


def _error_text(error: urllib.error.HTTPError) -> str:
  """The server's error message (OpenAI's {'error': {'message'}} shape), one line."""
  try:
    body = json.loads(error.read().decode())
    message = body.get('error', {}).get('message') or body
  except (ValueError, AttributeError, OSError):
    message = error.reason
  return ' '.join(str(message).split())[:200]

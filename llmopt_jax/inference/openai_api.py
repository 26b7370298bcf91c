"""The OpenAI API's wire format, as far as this project's server speaks it: request bodies
(pydantic models: a wrong type or a missing field is caught before any handler runs) and the
error shape every non-200 answer takes, {"error": {"message", "type", "param", "code"}}.

The message is one line that names the field (`temperature: Input should be a valid number`,
`messages.0.role: Field required`), replacing FastAPI's 422 list of pydantic errors with the
400 an OpenAI client expects. Fields a request may carry that this server does not read are
accepted and ignored, as OpenAI's SDKs send some of them by default; the server refuses, by
name, those whose value it cannot honour (`server.UNSUPPORTED`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import fastapi
import pydantic
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
  """An answer other than 200, in OpenAI's error shape."""

  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None, headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.headers = headers


class SamplingFields(pydantic.BaseModel):
  """What completions and chat completions share: how to sample (None: the server's
  default)."""
  model_config = pydantic.ConfigDict(extra='allow')  # OpenAI clients send more; ignored
  model: str | None = None
  max_tokens: int | None = None
  temperature: float | None = None
  top_p: float | None = None
  top_k: int | None = None   # not OpenAI's; vLLM's and llama.cpp's extension
  seed: int | None = None
  stop: str | list[str] | None = None


class CompletionRequest(SamplingFields):
  prompt: str | list[str]
  logprobs: int | None = None


class ChatMessage(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra='allow')  # name, tool_calls, ...: to the template
  role: str
  content: str | list[dict[str, Any]] | None = None


class ChatRequest(SamplingFields):
  messages: list[ChatMessage] = pydantic.Field(min_length=1)
  max_completion_tokens: int | None = None
  logprobs: bool = False


class ClassifyRequest(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra='allow')
  model: str | None = None
  input: str | list[str]


def install_error_handlers(app: fastapi.FastAPI) -> None:
  """Every error in OpenAI's shape, its message one line naming the field."""

  @app.exception_handler(ApiError)
  async def api_error(_, e: ApiError) -> JSONResponse:
    return error_response(e.status, e.message, e.param, e.code, e.headers)

  @app.exception_handler(RequestValidationError)
  async def invalid(_, e: RequestValidationError) -> JSONResponse:
    message, param = validation_message(e.errors())
    return error_response(400, message, param)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(_, e: StarletteHTTPException) -> JSONResponse:
    return error_response(e.status_code, str(e.detail), headers=e.headers)


# Parts of a validation error's location that name a type of a union, not a field.
_TYPE_TAG = re.compile(r'^(str|int|float|bool|list|dict|none)$|[\[\-]')


def validation_message(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
  """(one line, the top-level field) of pydantic's first complaint."""
  error = errors[0] if errors else {'loc': (), 'msg': 'invalid request', 'type': ''}
  if error['type'] == 'json_invalid':
    return f'the request body is not valid JSON: {error.get("ctx", {}).get("error", "")}', None
  path = []
  for part in error['loc'][1:]:  # loc[0] is 'body'
    if isinstance(part, str) and _TYPE_TAG.search(part):
      break
    path.append(str(part))
  if not path:
    return f'the request body must be a JSON object ({error["msg"]})', None
  return f'{".".join(path)}: {error["msg"]}', path[0]


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
  kind = 'invalid_request_error' if status < 500 else 'server_error'
  return JSONResponse({'error': {'message': ' '.join(message.split()), 'type': kind,
                                 'param': param, 'code': code}},
                      status_code=status, headers=headers)

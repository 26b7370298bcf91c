"""Chat messages -> one prompt string, with the checkpoint's own chat template.

A chat model was fine-tuned on conversations laid out in one exact format (role markers,
special tokens, where the assistant's turn begins); a prompt in any other layout is out of
distribution. Hugging Face checkpoints ship that format as a Jinja template: the
`chat_template` of tokenizer_config.json, or since transformers 4.43 a chat_template.jinja
file beside it. It is rendered here as `transformers`' `apply_chat_template` renders it: a
sandboxed environment (a template is data from the checkpoint, never trusted code),
trim_blocks and lstrip_blocks, the `raise_exception` and `strftime_now` helpers, a `tojson`
filter that keeps non-ASCII text, the special tokens (bos_token, eos_token, ...) as strings,
and `add_generation_prompt=True` so the text ends where the assistant's reply begins.

The rendered text already holds the template's special tokens (a BOS, turn markers), so it
is encoded without adding more (`HFText.encode` adds none).

A chat turn often ends with a token other than the tokenizer's eos (Llama 3's <|eot_id|>,
Qwen's <|im_end|>); `end_ids` collects every id the checkpoint declares as an end, so a reply
stops at its turn's end instead of running on into a made-up next turn.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from jinja2 import sandbox

TEMPLATE_FILE = 'chat_template.jinja'
TOKENIZER_CONFIG = 'tokenizer_config.json'
SPECIAL_TOKENS = ('bos_token', 'eos_token', 'unk_token', 'pad_token', 'sep_token', 'cls_token',
                  'mask_token')


class TemplateError(ValueError):
  """A conversation the template refuses (its `raise_exception`), or a broken template."""


class ChatTemplate:
  """`render(messages)` -> the prompt text of a conversation, ready for the reply."""

  def __init__(self, source: str, special_tokens: Mapping[str, str]):
    environment = sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=['jinja2.ext.loopcontrols'])
    environment.filters['tojson'] = _tojson
    environment.globals['raise_exception'] = _raise
    environment.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
      self._template = environment.from_string(source)
    except jinja2.TemplateError as e:
      raise TemplateError(f'the chat template does not parse: {e}') from None
    self.special_tokens = dict(special_tokens)

  def render(self, messages: Sequence[Mapping[str, Any]]) -> str:
    try:
      return self._template.render(messages=list(messages), add_generation_prompt=True,
                                   tools=None, documents=None, **self.special_tokens)
    except TemplateError:
      raise
    except jinja2.TemplateError as e:
      raise TemplateError(f'the chat template failed on these messages: {e}') from None


def load(directory: str | None) -> ChatTemplate | None:
  """The chat template of the tokenizer files in `directory`, or None if they hold none."""
  if not directory:
    return None
  config = _read_json(os.path.join(directory, TOKENIZER_CONFIG))
  source = _read_text(os.path.join(directory, TEMPLATE_FILE)) or config.get('chat_template')
  if isinstance(source, list):  # named templates: [{'name': 'default', 'template': ...}, ...]
    source = {t.get('name'): t.get('template') for t in source}.get('default')
  if not isinstance(source, str) or not source:
    return None
  specials = {name: _token_text(config.get(name)) for name in SPECIAL_TOKENS}
  return ChatTemplate(source, {k: v for k, v in specials.items() if v is not None})


def end_ids(directory: str | None, tokenizer_eos: int | None) -> list[int]:
  """Every id that ends a generation: the tokenizer's eos and the `eos_token_id`s of
  config.json and generation_config.json (an int or a list in either)."""
  ids = [] if tokenizer_eos is None else [int(tokenizer_eos)]
  for name in ('config.json', 'generation_config.json'):
    if directory:
      value = _read_json(os.path.join(directory, name)).get('eos_token_id')
      ids += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]
  return sorted(set(ids))


def model_end_ids(model) -> list[int]:
  """`end_ids` of a `LoadedModel`: its tokenizer's end token (if it has one) and those of
  its config files, so an instruct model also stops at its end-of-turn token."""
  tokenizer_eos = None
  with contextlib.suppress(ValueError):  # an HF tokenizer without an end token raises
    tokenizer_eos = model.tokenizer.eos_id
  return end_ids(model.tokenizer_dir, tokenizer_eos)


def _token_text(token: Any) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or {'content': ...}."""
  return token.get('content') if isinstance(token, dict) else token


def _tojson(value: Any, indent: int | None = None) -> str:
  return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise(message: str) -> None:
  raise TemplateError(f'the chat template refused the conversation: {message}')


def _read_json(path: str) -> dict[str, Any]:
  text = _read_text(path)
  try:
    return json.loads(text) if text else {}
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from None


def _read_text(path: str) -> str | None:
  if not os.path.isfile(path):
    return None
  with open(path, encoding='utf-8') as f:
    return f.read()

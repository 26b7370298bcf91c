"""A Hugging Face `tokenizer.json` (the `tokenizers` package), padded and truncated.

Every batch comes out at exactly `max_len` tokens, padded on the right, so a jitted model
compiles once. Special tokens are added as the tokenizer's post-processor defines them
(BERT's [CLS] ... [SEP], Llama's BOS), as `transformers`' tokenizers do by default.
`encode` and `eos_id` make the same object a tokenizer of the packed LM pipeline
(`data.tokenizers.Tokenizer`): whole documents, untruncated, for causal-LM fine-tuning.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tokenizers

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'vocab.txt', 'vocab.json', 'merges.txt', 'tokenizer.model',
                   'added_tokens.json')


def _read_json(directory: str, name: str) -> dict[str, Any]:
  file = os.path.join(directory, name)
  if not os.path.exists(file):
    return {}
  with open(file) as f:
    return json.load(f)


def _pad_id(tokenizer: tokenizers.Tokenizer, directory: str) -> int:
  """The padding id: tokenizer.json's own, else the pad token of the side files, else the
  model's `pad_token_id`, else its end-of-text id (Llama and GPT-2 ship no pad token; the
  attention mask hides padding, so any id works)."""
  if tokenizer.padding is not None:
    return tokenizer.padding['pad_id']
  for name in ('tokenizer_config.json', 'special_tokens_map.json'):
    token = _read_json(directory, name).get('pad_token')
    token = token.get('content') if isinstance(token, dict) else token
    if token is not None and tokenizer.token_to_id(token) is not None:
      return tokenizer.token_to_id(token)
  config = _read_json(directory, 'config.json')
  for key in ('pad_token_id', 'eos_token_id'):
    value = config.get(key)
    value = value[0] if isinstance(value, list) else value
    if isinstance(value, int):
      return value
  return 0


def _eos_id(tokenizer: tokenizers.Tokenizer, directory: str) -> int | None:
  """The end-of-text id: the model's `eos_token_id`, else the side files' eos token."""
  value = _read_json(directory, 'config.json').get('eos_token_id')
  value = value[0] if isinstance(value, list) else value
  if isinstance(value, int):
    return value
  for name in ('tokenizer_config.json', 'special_tokens_map.json'):
    token = _read_json(directory, name).get('eos_token')
    token = token.get('content') if isinstance(token, dict) else token
    if token is not None and tokenizer.token_to_id(token) is not None:
      return tokenizer.token_to_id(token)
  return None


class HFTokenizer:
  """Texts -> {'tokens', 'padding_mask'(, 'token_types')}: int32 [B, max_len] each, named
  like the model's arguments so `model(**batch)` works."""

  def __init__(self, path: str, max_len: int, *, token_types: bool | None = None):
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(path, 'tokenizer.json') if os.path.isdir(path) else path
    if not os.path.exists(file):
      raise FileNotFoundError(f'{file}: no tokenizer.json (only the fast-tokenizer file format '
                              f'of Hugging Face is read)')
    if max_len < 1:
      raise ValueError(f'max_len must be >= 1, got {max_len}')
    self._tokenizer = tokenizers.Tokenizer.from_file(file)
    self._documents = tokenizers.Tokenizer.from_file(file)  # `encode`: no padding, no cut
    self._documents.no_truncation()
    self._documents.no_padding()
    self._directory = directory
    self.max_len = max_len
    self.pad_id = _pad_id(self._tokenizer, directory)
    if token_types is None:  # BERT's embeddings read them; decoders have no such input
      token_types = _read_json(directory, 'config.json').get('type_vocab_size', 0) > 0
    self.token_types = token_types
    self._tokenizer.enable_truncation(max_length=max_len)
    self._tokenizer.enable_padding(pad_id=self.pad_id, length=max_len, direction='right',
                                   pad_token=self._tokenizer.id_to_token(self.pad_id) or '')

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def __call__(self, texts: Sequence[str],
               pairs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Encodes a batch of texts (or of text pairs, BERT's sentence A/B)."""
    inputs = list(texts) if pairs is None else list(zip(texts, pairs, strict=True))
    encodings = self._tokenizer.encode_batch(inputs)
    batch = {
        'tokens': np.array([e.ids for e in encodings], np.int32),
        'padding_mask': np.array([e.attention_mask for e in encodings], np.int32),
    }
    if self.token_types:
      batch['token_types'] = np.array([e.type_ids for e in encodings], np.int32)
    return batch

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  @property
  def eos_id(self) -> int:
    """Ends each document in a packed LM stream; a one-line error when the model has none."""
    eos = _eos_id(self._tokenizer, self._directory)
    if eos is None:
      raise ValueError(f'{self._directory}: no end-of-text token (config.json eos_token_id or '
                       f'tokenizer_config.json eos_token), which LM fine-tuning needs')
    return eos

  def encode(self, text: str) -> np.ndarray:
    """int32 ids of a whole document, with the post-processor's specials (Llama's BOS), so
    a packed document starts as the model saw documents start."""
    return np.asarray(self._documents.encode(text).ids, np.int32)


def load_tokenizer(path: str, max_len: int, *, token_types: bool | None = None) -> HFTokenizer:
  """The tokenizer of an HF model directory (or a tokenizer.json file), padding and
  truncating to `max_len`; token types are returned when config.json has a BERT-style
  `type_vocab_size` (or when `token_types` says so)."""
  return HFTokenizer(path, max_len, token_types=token_types)

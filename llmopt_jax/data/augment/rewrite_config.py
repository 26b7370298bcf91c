"""The generator behind the rewrite operations: `config.data.rewrite`, read and checked once.

  config.data.augment = ('paraphrase:0.5', 'synonym:0.1')
  config.data.rewrite.backend = 'endpoint'       # or 'engine'
  config.data.rewrite.model = 'gpt-4o-mini'      # engine: a causal LM's directory or workdir
  config.data.rewrite.base_url = 'http://localhost:8000/v1'

Two backends (`inference/rewriters.py`): 'engine' runs a local causal LM in this project's
generation engine (a Hugging Face directory, or a finished pretrain/finetune_lm workdir, read
as the generate stage reads one); 'endpoint' asks any OpenAI-compatible chat server, with the
key taken from the environment variable `api_key_env`. `keep_label_of` names a classifier (a
finished classification run, or 'teacher' in a distillation) whose predicted label a rewrite
must keep, else it is dropped (`rewriters.label_preserving`).

Values are checked here, without touching the disk or the network; whether the model and the
server are there is checked when rewrites are generated (`rewrites.py`), so a run whose
rewrites are already on disk needs neither.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

FIELD = 'config.data.rewrite'
BACKENDS = ('engine', 'endpoint')
TEACHER = 'teacher'  # keep_label_of: the distillation's teacher


@dataclasses.dataclass(frozen=True)
class RewriteConfig:
  backend: str = 'endpoint'
  model: str = ''              # engine: a model directory; endpoint: the served model's name
  base_url: str = 'http://localhost:8000/v1'
  api_key_env: str = ''        # the environment variable holding the key; '' = none
  concurrency: int = 4         # endpoint requests in flight
  timeout_s: float = 60.0      # per endpoint request; a request that fails is asked next run
  temperature: float = 0.7
  max_new_tokens: int = 64
  pivot: str = 'French'        # back-translation's language in between
  batch_size: int = 64         # prompts per generator call, cached after each
  keep_label_of: str = ''      # '' | a finished classifier's workdir | 'teacher'

  @classmethod
  def from_config(cls, section: Mapping[str, Any]) -> RewriteConfig:
    """From `config.data.rewrite`; every bad value is a one-line error naming its field."""
    fields = dict(section)
    if unknown := sorted(set(fields) - {f.name for f in dataclasses.fields(cls)}):
      raise ValueError(f'{FIELD}.{unknown[0]}: no such field; the fields are '
                       f'{[f.name for f in dataclasses.fields(cls)]}')
    config = cls(**fields)
    config.check()
    return config

  def check(self) -> None:
    if self.backend not in BACKENDS:
      raise ValueError(f'{FIELD}.backend={self.backend!r}; choose from {list(BACKENDS)}')
    if not _text(self.model):
      what = ('a Hugging Face causal LM directory or a finished pretrain/finetune_lm workdir'
              if self.backend == 'engine' else "the endpoint's model name")
      raise ValueError(f'{FIELD}.model={self.model!r}: name the model ({what})')
    for name in ('concurrency', 'max_new_tokens', 'batch_size'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{FIELD}.{name}={value!r} must be an integer >= 1')
    for name, low, strict in (('timeout_s', 0.0, True), ('temperature', 0.0, False)):
      value = getattr(self, name)
      if (isinstance(value, bool) or not isinstance(value, numbers.Real)
          or value < low or (strict and value == low)):
        raise ValueError(f'{FIELD}.{name}={value!r} must be a number '
                         f'{">" if strict else ">="} {low:g}')
    for name in ('base_url', 'api_key_env', 'keep_label_of'):
      value = getattr(self, name)
      if not isinstance(value, str):
        raise ValueError(f'{FIELD}.{name}={value!r} must be a string')  # noqa: TRY004
    if not _text(self.pivot):
      raise ValueError(f'{FIELD}.pivot={self.pivot!r}: name the language back-translation '
                       f'goes through, e.g. French')

  def label_model(self, teacher_dir: str | None) -> str:
    """The classifier that filters rewrites ('' = none); 'teacher' is `teacher_dir`, the
    distillation's teacher, and an error in a run without one."""
    if self.keep_label_of != TEACHER:
      return self.keep_label_of
    if teacher_dir is None:
      raise ValueError(f"{FIELD}.keep_label_of='teacher': only a distillation has a teacher; "
                       f'name a finished classification workdir instead')
    return teacher_dir

  def fingerprint(self) -> dict[str, Any]:
    """What decides the rewrites (not how fast they come): recorded with them."""
    skip = ('concurrency', 'timeout_s', 'batch_size', 'api_key_env')
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def _text(value: Any) -> bool:
  return isinstance(value, str) and bool(value.strip())

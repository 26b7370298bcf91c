"""The LLM advisor's settings, `config.sweep.llm`, read into a typed record and checked.

Used by the samplers 'llm' (the LLM proposes every trial) and 'llm_warm_start' (it proposes
the first `warm_start_trials`, TPE continues). The endpoint is any OpenAI-compatible server
(`base_url`, `model`); its key comes from the environment variable `api_key_env` names,
never from the config. `backend='replay'` answers every request from the LLM exchanges
recorded in another sweep's study (`replay_from`: its workdir, or a database URL), so a
study reruns exactly with no server. `prompt` is '' for the default template
(`sweeps/prompt.py`), a path to a text file, or the template text itself.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import ml_collections

from llmopt_jax import checks
from llmopt_jax.sweeps import prompt as prompt_lib

LLM_SAMPLERS = ('llm', 'llm_warm_start')
BACKENDS = ('http', 'replay')
CARD_FIELDS = ('dataset', 'model', 'metric', 'budget', 'hardware', 'notes')
FIELD = 'config.sweep.llm'


@dataclasses.dataclass(frozen=True)
class LlmConfig:
  backend: str                 # 'http' | 'replay'
  base_url: str
  model: str
  api_key_env: str             # '' = no key
  timeout_s: float
  temperature: float
  max_tokens: int
  json_mode: bool
  max_attempts: int            # answers tried per trial before TPE samples it
  warm_start_trials: int       # llm_warm_start: trials numbered below this are the LLM's
  history_best: int            # trials the prompt shows: the best ones...
  history_recent: int          # ...and the most recent others
  template: str                # the prompt template's text
  task_card: Mapping[str, str]
  replay_from: str
  replay_study: str            # '' = the sweep's own study name

  @classmethod
  def from_config(cls, llm: ml_collections.ConfigDict, sampler: str) -> LlmConfig:
    checks.choice(f'{FIELD}.backend', llm.backend, BACKENDS)
    for name in ('max_attempts', 'max_tokens'):
      checks.int_at_least(f'{FIELD}.{name}', llm[name], 1)
    for name in ('warm_start_trials', 'history_best', 'history_recent'):
      checks.int_at_least(f'{FIELD}.{name}', llm[name], 0)
    if sampler == 'llm_warm_start' and llm.warm_start_trials < 1:
      raise ValueError(f'{FIELD}.warm_start_trials={llm.warm_start_trials}: sampler '
                       f'llm_warm_start needs at least 1 trial from the LLM')
    if not llm.timeout_s > 0:
      raise ValueError(f'{FIELD}.timeout_s={llm.timeout_s!r}: seconds > 0')
    if llm.backend == 'http' and not llm.model:
      raise ValueError(f"{FIELD}.model='': name the model the server should answer with "
                       f'(GET <base_url>/models lists them)')
    if llm.backend == 'replay' and not llm.replay_from:
      raise ValueError(f"{FIELD}.replay_from='': backend=replay answers from another sweep's "
                       f'recorded study; give its workdir or database URL')
    unknown = sorted(set(llm.task_card) - set(CARD_FIELDS))
    if unknown:
      raise ValueError(f'{FIELD}.task_card.{unknown[0]}: not a task card field; choose from '
                       f'{list(CARD_FIELDS)}')
    template = _template(llm.prompt)
    prompt_lib.check_template(template, f'{FIELD}.prompt')
    return cls(
        backend=llm.backend, base_url=llm.base_url, model=llm.model,
        api_key_env=llm.api_key_env, timeout_s=float(llm.timeout_s),
        temperature=float(llm.temperature), max_tokens=llm.max_tokens,
        json_mode=bool(llm.json_mode), max_attempts=llm.max_attempts,
        warm_start_trials=llm.warm_start_trials, history_best=llm.history_best,
        history_recent=llm.history_recent, template=template,
        task_card={k: str(llm.task_card.get(k, '')) for k in CARD_FIELDS},
        replay_from=llm.replay_from, replay_study=llm.replay_study)


def _template(prompt: str) -> str:
  """The template text: the default, a file's contents, or `prompt` itself."""
  if not prompt:
    return prompt_lib.DEFAULT_TEMPLATE
  if '\n' not in prompt and prompt.endswith(('.txt', '.md', '.jinja', '.tmpl')):
    if not os.path.isfile(prompt):
      raise ValueError(f'{FIELD}.prompt={prompt!r}: no such template file')
    with open(prompt, encoding='utf-8') as f:
      return f.read()
  return prompt

"""The `llm` sampler: an LLM proposes each trial's whole configuration, Optuna runs it.

As an Optuna sampler it shares everything the other samplers have (workers, storage, pruning,
retries, reports): for a trial it asks the model once, through `sample_relative`, with the
prompt of `sweeps/prompt.py`; the answer is parsed and checked (`sweeps/proposals.py`); a
rejected answer (malformed, out of the space, a repeat) or a failed request is answered with
the reason and asked again, up to `max_attempts` times, after which TPE samples the trial
("fallback", said in the log and the report). Mode `llm_warm_start` asks the LLM for the
first `warm_start_trials` trials only; TPE continues from their results.

What a trial records (user attrs, so it lives in the study's database): 'proposer' ('llm',
'fallback' or 'tpe'), 'reason' (the model's, or why it fell back) and 'llm', the exchanges:
each attempt's messages, the answer, the error, the seconds and the token usage. Never the
API key (it exists only in the request header). `backend='replay'` answers each attempt
with the one recorded for the same trial number and attempt in another study, so a study
reruns with no server and, for a deterministic objective, with the same parameters.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial

from llmopt_jax import report
from llmopt_jax.openai_client import ChatAnswer, ChatClient, ChatError
from llmopt_jax.sweeps import prompt, proposals
from llmopt_jax.sweeps.config import SweepConfig
from llmopt_jax.sweeps.llm_config import FIELD

_SECONDS = re.compile(r', "seconds": [0-9.e+-]+')
Transport = Callable[[list[dict[str, str]], int, int], ChatAnswer]  # (messages, trial, attempt)


class LlmSampler(optuna.samplers.BaseSampler):
  """Proposals from an LLM (trials numbered below `llm_trials`, or all), `fallback` else."""

  def __init__(self, sweep: SweepConfig, transport: Transport,
               fallback: optuna.samplers.BaseSampler, llm_trials: int | None = None) -> None:
    self._sweep = sweep
    self._llm = sweep.llm
    self._transport = transport
    self._fallback = fallback
    self._llm_trials = llm_trials
    self._card = prompt.task_card(self._llm.task_card, sweep.metric, sweep.direction,
                                  sweep.budget)

  def infer_relative_search_space(self, study: optuna.Study,
                                  trial: FrozenTrial) -> dict[str, BaseDistribution]:
    del study, trial  # the space is the sweep's, known before any trial
    return self._sweep.space.distributions()

  def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                      search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
    if not search_space:
      return {}
    if self._llm_trials is not None and trial.number >= self._llm_trials:
      _record(study, trial, proposer='tpe', reason='')
      return {}
    return self._propose(study, trial)

  def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                         param_distribution: BaseDistribution) -> Any:
    return self._fallback.sample_independent(study, trial, param_name, param_distribution)

  def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
    self._fallback.before_trial(study, trial)

  def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: Any,
                  values: Any) -> None:
    self._fallback.after_trial(study, trial, state, values)

  def reseed_rng(self) -> None:
    self._fallback.reseed_rng()

  def _propose(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    """The LLM's checked proposal for `trial`, or {} (TPE samples it) after max_attempts."""
    others = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]
    messages = self._messages(others)
    exchanges: list[dict[str, Any]] = []
    for attempt in range(self._llm.max_attempts):
      exchange = {'attempt': attempt, 'messages': messages, 'answer': None, 'error': None,
                  'seconds': 0.0, 'usage': {}}
      exchanges.append(exchange)
      try:
        answer = self._transport(messages, trial.number, attempt)
        exchange.update(answer=answer.text, seconds=round(answer.seconds, 3),
                        usage=answer.usage)
        params, reason = proposals.parse(answer.text, self._sweep.space)
        proposals.check_new(params, others, trial.number)
      except ChatError as e:
        exchange['error'] = f'no answer: {e}'
        messages = [*messages, _user(f'The request got no answer ({e}). Answer again, '
                                     f'briefly, with one JSON object.')]
      except proposals.Rejected as e:
        exchange['error'] = str(e)
        messages = [*messages, {'role': 'assistant', 'content': answer.text},
                    _user(f'That answer was rejected: {e}. Answer again with one JSON object '
                          f'in the form given.')]
      else:
        _record(study, trial, proposer='llm', reason=reason, llm=exchanges)
        report.say(f'Trial {trial.number}: proposed by the LLM (attempt {attempt + 1}): '
                   f'{reason or "no reason given"}')
        return params
    why = (f'no usable proposal in {len(exchanges)} attempt(s); last: '
           f'{exchanges[-1]["error"]}')
    _record(study, trial, proposer='fallback', reason=why, llm=exchanges)
    report.say(f'Trial {trial.number}: the LLM gave {why}; TPE samples this trial.')
    return {}

  def _messages(self, others: list[FrozenTrial]) -> list[dict[str, str]]:
    sweep = self._sweep
    history = prompt.history(others, self._llm.history_best, self._llm.history_recent,
                             sweep.direction == 'maximize')
    return prompt.messages(self._llm.template, self._card, sweep.space.describe(), history,
                           len(others), sweep.budget, sweep.metric, sweep.direction)


def make_sampler(sweep: SweepConfig, worker: int = 0) -> LlmSampler:
  """The sweep's LLM sampler: its transport (a server, or a recorded study) and TPE behind
  it, seeded like the 'tpe' sampler (sampler_seed + the worker's number). After a warm start
  TPE models the LLM's trials at once, rather than first sampling its own random ones."""
  from llmopt_jax.sweeps import study  # the 'tpe' sampler's construction, shared
  seed = None if sweep.sampler_seed < 0 else sweep.sampler_seed + worker
  llm_trials = sweep.llm.warm_start_trials if sweep.sampler == 'llm_warm_start' else None
  startup = min(sweep.startup_trials, llm_trials or sweep.startup_trials)
  fallback = study.tpe(seed, startup)
  transport = replay(sweep) if sweep.llm.backend == 'replay' else _http(sweep)
  return LlmSampler(sweep, transport, fallback, llm_trials)


def _http(sweep: SweepConfig) -> Transport:
  llm = sweep.llm
  client = ChatClient(llm.base_url, llm.model, api_key_env=llm.api_key_env,
                      timeout_s=llm.timeout_s, temperature=llm.temperature,
                      max_tokens=llm.max_tokens, json_mode=llm.json_mode, field=FIELD)
  client.check_reachable()
  return lambda messages, number, attempt: client.chat(messages)


def replay(sweep: SweepConfig) -> Transport:
  """Answers each (trial, attempt) as the recorded study did: its answer, or its failure."""
  records = _recorded(sweep.llm.replay_from, sweep.llm.replay_study or sweep.study_name)
  differed: set[int] = set()

  def transport(messages: list[dict[str, str]], number: int, attempt: int) -> ChatAnswer:
    exchanges = records.get(number, [])
    if attempt >= len(exchanges):
      raise ChatError(f'the replayed study has no answer for trial {number}, attempt '
                      f'{attempt + 1}')
    exchange = exchanges[attempt]
    if _timeless(exchange['messages']) != _timeless(messages) and number not in differed:
      differed.add(number)
      report.say(f'Replay: trial {number} is asked with another prompt than recorded (the '
                 f'history differs); it gets the recorded answer all the same.')
    if exchange['answer'] is None:
      raise ChatError(exchange['error'].removeprefix('no answer: '))
    return ChatAnswer(exchange['answer'], exchange['seconds'], exchange['usage'])
  return transport


def _timeless(messages: list[dict[str, str]]) -> list[str]:
  """The messages without the trials' run times, which differ on every rerun."""
  return [_SECONDS.sub('', m['content']) for m in messages]


def _recorded(source: str, study_name: str) -> dict[int, list[dict[str, Any]]]:
  """trial number -> its recorded exchanges, from a sweep workdir's study.db or a URL."""
  field = f'{FIELD}.replay_from={source!r}'
  url = source
  if '://' not in source:
    path = os.path.join(source, 'study.db')
    if not os.path.isfile(path):
      raise ValueError(f'{field}: no study.db there (give a sweep workdir or a database URL)')
    url = f'sqlite:///{os.path.abspath(path)}'
  try:
    study = optuna.load_study(study_name=study_name, storage=url)
  except KeyError:
    raise ValueError(f'{field}: it holds no study named {study_name!r} (set '
                     f'{FIELD}.replay_study)') from None
  records = {t.number: t.user_attrs['llm'] for t in study.get_trials(deepcopy=False)
             if t.user_attrs.get('llm')}
  if not records:
    raise ValueError(f'{field}: study {study_name!r} holds no recorded LLM answers')
  return records


def _record(study: optuna.Study, trial: FrozenTrial, **attrs: Any) -> None:
  for key, value in attrs.items():
    study._storage.set_trial_user_attr(trial._trial_id, key, value)  # noqa: SLF001


def _user(content: str) -> dict[str, str]:
  return {'role': 'user', 'content': content}

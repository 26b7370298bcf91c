"""The `llm` sampler of sweeps against a real OpenAI-compatible HTTP server on loopback.

The server (`openai_stub.py`) answers with scripted text and records every request, so each
property is checked where it matters, on the wire: a valid proposal becomes the trial's
parameters exactly; each kind of invalid answer, and an answer that comes too late, is
rejected, and the next request the server receives carries that rejection; after
max_attempts failures TPE samples the trial ('fallback') inside the space; a repeat of an
earlier trial is refused; the prompt holds the space with its bounds and the history.
The sampler tests run in an in-memory Optuna study with a pure-Python objective
(milliseconds); one end-to-end test runs the sweep stage on tiny pretrain trials, checks the
API key reaches the server and no file of the run, and replays the recorded study with no
server at all. Bad input is one line naming the field.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import socket

import ml_collections
import optuna
import pytest

from conftest import load_config
from llmopt_jax import stages
from llmopt_jax.sweeps import llm_sampler, proposals
from llmopt_jax.sweeps import space as space_lib
from llmopt_jax.sweeps.config import SweepConfig
from openai_stub import MODEL, Answer, OpenAIStub
from test_sweep import read_json, trials_of

KEY_ENV = 'LLMOPT_TEST_LLM_KEY'
# Every kind of searched field: a log float, a linear float, an int on a step, a categorical,
# and named variants (the categorical parameter 'variant').
SPACE = {'optim': {'lr': ('float', 0.001, 0.01, 'log'), 'weight_decay': ('float', 0.0, 0.2),
                   'warmup_steps': ('int', 0, 4, 2),
                   'schedule': ('categorical', ('cosine', 'linear'))}}
VARIANTS = {'narrow': {'model': {'mlp_dim': 128}}, 'wide': {'model': {'mlp_dim': 192}}}
VALID = [{'optim.lr': 0.002, 'optim.weight_decay': 0.05, 'optim.warmup_steps': 2,
          'optim.schedule': 'linear', 'variant': 'wide'},
         {'optim.lr': 0.005, 'optim.weight_decay': 0.1, 'optim.warmup_steps': 4,
          'optim.schedule': 'cosine', 'variant': 'narrow'},
         {'optim.lr': 0.008, 'optim.weight_decay': 0.15, 'optim.warmup_steps': 0,
          'optim.schedule': 'cosine', 'variant': 'wide'}]


def _with(changes: dict) -> dict:
  """VALID[0] with `changes` ({path: value}; a value of ... drops the parameter)."""
  params = {**VALID[0], **changes}
  return {path: value for path, value in params.items() if value is not ...}


def proposal(params: dict, reason: str = 'a sensible next point') -> str:
  return json.dumps({'params': params, 'reason': reason})


# (answer text, the parameter its rejection must name, or None for a malformed answer)
INVALID = {
    'malformed_json': ('{"params": {"optim.lr": 0.002,', None),
    'empty': ('', None),
    'not_an_object': ('[0.002, 0.05, 2]', None),
    'no_params': (json.dumps({'reason': 'no idea'}), None),
    'unknown_key': (proposal(_with({'optim.b1': 0.9})), 'optim.b1'),
    'missing_key': (proposal(_with({'optim.warmup_steps': ...})), 'optim.warmup_steps'),
    'string_number': (proposal(_with({'optim.lr': '3e-3'})), 'optim.lr'),
    'bool_for_int': (proposal(_with({'optim.warmup_steps': True})), 'optim.warmup_steps'),
    'above_high': (proposal(_with({'optim.lr': 0.05})), 'optim.lr'),
    'below_low': (proposal(_with({'optim.weight_decay': -0.05})), 'optim.weight_decay'),
    'off_the_step': (proposal(_with({'optim.warmup_steps': 3})), 'optim.warmup_steps'),
    'not_a_choice': (proposal(_with({'optim.schedule': 'constant'})), 'optim.schedule'),
    'not_a_variant': (proposal(_with({'variant': 'huge'})), 'variant'),
}


@pytest.fixture
def stub():
  server = OpenAIStub()
  yield server
  server.stop()


@pytest.fixture
def dead_url():
  """A base_url where nothing listens: a port bound (so no one else takes it) but not
  listening, which refuses connections."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    yield f'http://127.0.0.1:{s.getsockname()[1]}/v1'


def llm_config(base_url: str, *, sampler: str = 'llm', trials: int = 3, space=SPACE,
               variants=VARIANTS, **llm) -> ml_collections.ConfigDict:
  """configs/sweep.py:base=pretrain,tiny asking the server at `base_url`, no pruning."""
  config = load_config('sweep', 'base=pretrain,tiny')
  config.sweep.update(sampler=sampler, trials=trials, pruner='none')
  config.sweep.space = ml_collections.ConfigDict(space)
  config.sweep.variants = ml_collections.ConfigDict(variants)
  config.sweep.llm.update({'base_url': base_url, 'model': MODEL, **llm})
  return config


def score(overrides: dict) -> float:
  """A pure-Python objective with short values (0.25 steps), so they print alike in any
  format a prompt may use."""
  return round(4 * abs(math.log10(overrides['optim.lr'] / 0.003))) / 4 + overrides[
      'optim.warmup_steps'] / 4


def run_study(config: ml_collections.ConfigDict, n_trials: int) -> optuna.Study:
  """`n_trials` trials of an in-memory study sampled by the sweep's sampler (worker 0); the
  objective suggests through the space exactly as the sweep's does."""
  sweep = SweepConfig.from_config(config)
  study = optuna.create_study(direction=sweep.direction,
                              sampler=llm_sampler.make_sampler(sweep, 0))
  study.optimize(lambda trial: score(sweep.space.suggest(trial)[1]), n_trials=n_trials)
  return study


def shows(text: str, x) -> bool:
  """Whether `text` shows the number or string `x` in some usual rendering."""
  if isinstance(x, str):
    return x in text
  forms = {repr(x), str(x), json.dumps(x), *(format(x, f) for f in ('g', '.3g', '.4g', '.6g'))}
  if isinstance(x, float):
    forms |= {format(x, f) for f in ('.2f', '.3f', '.4f', '.3e', '.4e')}
  return any(re.search(rf'(?<![\d.]){re.escape(f)}(?![\d])', text) for f in forms)


def rejection(text: str, space: space_lib.SearchSpace) -> str:
  """The one-line message proposals.parse rejects `text` with."""
  with pytest.raises(proposals.Rejected) as caught:
    proposals.parse(text, space)
  assert str(caught.value) and '\n' not in str(caught.value)
  return str(caught.value)


def test_parse_takes_valid_answers_as_given_with_their_types():
  space = SweepConfig.from_config(llm_config('http://127.0.0.1:1/v1')).space
  for params in VALID:
    assert proposals.parse(proposal(params, 'because'), space) == (params, 'because')
  params, reason = proposals.parse(
      '```json\n' + json.dumps({'params': _with({'optim.weight_decay': 0, 'optim.lr': 0.004})})
      + '\n```', space)
  assert reason == ''
  assert params == _with({'optim.weight_decay': 0.0, 'optim.lr': 0.004})
  assert type(params['optim.weight_decay']) is float  # a JSON 0 for a float field
  assert type(params['optim.warmup_steps']) is int


def test_check_new_refuses_a_repeat_naming_the_trial():
  sweep = SweepConfig.from_config(llm_config('http://127.0.0.1:1/v1'))
  study = optuna.create_study()
  for k, params in enumerate(VALID[:2]):
    study.add_trial(optuna.trial.create_trial(
        params=params, distributions=sweep.space.distributions(), value=float(k)))
  trials = study.get_trials()
  proposals.check_new(VALID[2], trials, 2)
  proposals.check_new(VALID[1], trials, 1)  # a trial is no repeat of itself (a retry)
  with pytest.raises(proposals.Rejected, match='trial 1'):
    proposals.check_new(VALID[1], trials, 2)


def proposer(trial: optuna.trial.FrozenTrial) -> str | None:
  return trial.user_attrs.get('proposer')


def inside(params: dict, space: space_lib.SearchSpace) -> bool:
  """Whether `params` is a point of `space`: every parameter, in bounds, on the step."""
  for d in space.dimensions:
    value = params[d.path]
    if d.kind == 'categorical':
      if value not in d.choices:
        return False
    elif not d.low <= value <= d.high or (d.kind == 'int' and (value - d.low) % d.step):
      return False
  expected = {d.path for d in space.dimensions} | ({'variant'} if space.variants else set())
  return set(params) == expected and params.get('variant', 'x') in (space.variants or {'x'})


def test_a_valid_proposal_becomes_the_trial_as_given(stub):
  stub.script(proposal(VALID[0], 'start near the defaults'))
  study = run_study(llm_config(stub.base_url), 1)
  (trial,) = study.get_trials()
  assert trial.params == VALID[0]
  assert type(trial.params['optim.warmup_steps']) is int
  assert proposer(trial) == 'llm' and trial.user_attrs['reason'] == 'start near the defaults'
  (exchange,) = trial.user_attrs['llm']
  assert exchange['answer'] == proposal(VALID[0], 'start near the defaults')
  assert exchange['error'] is None
  assert exchange['messages'] == stub.requests[0].messages
  assert stub.requests[0].body['model'] == MODEL


def _rejected_then_retried(stub, bad: Answer, expected: str, **llm) -> None:
  """One trial: `bad`, then a valid answer. The second request carries `expected` in a user
  message the first did not have; the trial takes the valid answer."""
  stub.script(bad, proposal(VALID[1]))
  study = run_study(llm_config(stub.base_url, max_attempts=2, **llm), 1)
  (trial,) = study.get_trials()
  assert (trial.params, proposer(trial)) == (VALID[1], 'llm')
  assert len(stub.requests) == 2
  first, second = stub.requests
  carried = [m for m in second.messages if m not in first.messages]
  assert any(m['role'] == 'user' and expected in m['content'] for m in carried), carried
  errors = [e['error'] for e in trial.user_attrs['llm']]
  assert len(errors) == 2 and expected in errors[0] and errors[1] is None


@pytest.mark.parametrize('kind', list(INVALID))
def test_an_invalid_answer_is_rejected_naming_the_parameter_and_sent_back(stub, kind):
  """parse's rejection names the parameter at fault, and the model is told it."""
  text, name = INVALID[kind]
  expected = rejection(text, SweepConfig.from_config(llm_config(stub.base_url)).space)
  assert name is None or name in expected, expected
  _rejected_then_retried(stub, Answer(text), expected)


def test_an_answer_too_late_is_retried_with_the_timeout_said(stub):
  _rejected_then_retried(stub, Answer(proposal(VALID[0]), delay_s=1.5),
                         'timed out after 0.5 s', timeout_s=0.5)


def test_after_max_attempts_failures_tpe_samples_the_trial_inside_the_space(stub):
  stub.script(INVALID['malformed_json'][0], INVALID['above_high'][0],
              Answer('overloaded', status=503))
  config = llm_config(stub.base_url, max_attempts=3)
  study = run_study(config, 1)
  (trial,) = study.get_trials()
  assert proposer(trial) == 'fallback'
  assert inside(trial.params, SweepConfig.from_config(config).space), trial.params
  assert len(stub.requests) == 3 and stub.left == 0
  errors = [e['error'] for e in trial.user_attrs['llm']]
  assert len(errors) == 3 and all(errors) and 'HTTP 503' in errors[2], errors


def test_a_repeat_of_an_earlier_trial_is_refused(stub):
  stub.script(proposal(VALID[0]), proposal(VALID[0]), proposal(VALID[1]))
  study = run_study(llm_config(stub.base_url, max_attempts=2), 2)
  assert [t.params for t in study.get_trials()] == VALID[:2]
  assert [proposer(t) for t in study.get_trials()] == ['llm', 'llm']
  repeat = [m for m in stub.requests[2].messages if m not in stub.requests[1].messages]
  assert any(m['role'] == 'user' and 'trial 0' in m['content'] for m in repeat), repeat


def test_the_prompt_holds_the_space_and_the_history(stub):
  stub.script(*(proposal(p) for p in VALID))
  config = llm_config(stub.base_url)
  study = run_study(config, 3)
  space = SweepConfig.from_config(config).space
  first, _, third = (r.text for r in stub.requests)
  for d in space.dimensions:
    bounds = d.choices if d.kind == 'categorical' else (d.low, d.high)
    for text in (first, third):
      assert d.path in text and all(shows(text, b) for b in bounds), (d.path, bounds)
  assert all(shows(third, name) for name in VARIANTS)
  assert 'log' in first  # the learning rate is searched on a log scale
  for trial in study.get_trials()[:2]:  # on one line: its every parameter and its value
    assert any(all(shows(line, v) for v in [*trial.params.values(), trial.value])
               for line in third.splitlines()), (trial.params, trial.value)


def test_a_template_file_from_config_is_the_prompt(stub, tmp_path):
  template = tmp_path / 'prompt.txt'
  template.write_text('Tune for {metric} ({direction}), {trials_left} trials left.\n'
                      'Space: {space}\nSo far: {history}\n{answer_format}', encoding='utf-8')
  stub.script(proposal(VALID[0]))
  run_study(llm_config(stub.base_url, prompt=str(template)), 1)
  user = [m['content'] for m in stub.requests[0].messages if m['role'] == 'user']
  assert len(user) == 1 and user[0].startswith('Tune for eval/loss (minimize), 3 trials left.')
  assert all(d in user[0] for d in VALID[0]) and not re.search(r'\{[a-z_]+\}', user[0])


def test_warm_start_asks_the_llm_for_its_trials_only(stub):
  stub.script(proposal(VALID[0]), proposal(VALID[1]))
  study = run_study(llm_config(stub.base_url, sampler='llm_warm_start', warm_start_trials=2),
                    4)
  trials = study.get_trials()
  assert [proposer(t) for t in trials] == ['llm', 'llm', 'tpe', 'tpe']
  assert [t.params for t in trials[:2]] == VALID[:2]
  assert len(stub.requests) == 2 and stub.left == 0
  assert 'llm' not in trials[2].user_attrs or not trials[2].user_attrs['llm']


TINY_SPACE = {'optim': {'lr': ('float', 0.001, 0.009, 'log')}}


def files_holding(directory, secret: bytes) -> list[str]:
  found = []
  for root, _, names in os.walk(directory):
    for name in names:
      with open(os.path.join(root, name), 'rb') as f:
        if secret in f.read():
          found.append(os.path.join(root, name))
  return found


def test_stage_sends_the_key_writes_it_nowhere_and_replay_repeats_the_study(
    stub, dead_url, tfds_dir, tmp_path, monkeypatch, capfd):
  """Two tiny pretrain trials proposed over HTTP with a key from the environment; then the
  same sweep replayed from the recorded study into a fresh workdir with no server."""
  secret = f'sk-test-{secrets.token_hex(16)}'
  monkeypatch.setenv(KEY_ENV, secret)
  chosen = [{'optim.lr': 0.002}, {'optim.lr': 0.006}]
  reasons = ['below the default, to be safe', 'above it, to compare']
  stub.script(*(proposal(p, r) for p, r in zip(chosen, reasons, strict=True)))
  config = llm_config(stub.base_url, trials=2, space=TINY_SPACE, variants={},
                      api_key_env=KEY_ENV)
  config.base.data.tfds_data_dir = str(tfds_dir)
  recorded = tmp_path / 'recorded'
  stages.run(config, str(recorded))

  assert [(t.params, proposer(t)) for t in trials_of(recorded)] == [
      (p, 'llm') for p in chosen]
  assert len(stub.requests) == 2
  assert all(r.headers.get('authorization') == f'Bearer {secret}' for r in stub.requests)
  assert files_holding(recorded, secret.encode()) == []
  output = capfd.readouterr()
  assert secret not in output.out + output.err
  rows = read_json(recorded / 'report.json')['trials']
  assert [(r['proposer'], r['reason']) for r in rows] == [('llm', r) for r in reasons]
  markdown = (recorded / 'report.md').read_text(encoding='utf-8')
  assert 'proposer' in markdown and all(r in markdown for r in reasons)

  stub.stop()
  replay = llm_config(dead_url, trials=2, space=TINY_SPACE, variants={}, backend='replay',
                      replay_from=str(recorded))
  replay.base.data.tfds_data_dir = str(tfds_dir)
  stages.run(replay, str(tmp_path / 'replayed'))
  assert [(t.params, proposer(t), t.user_attrs['reason'])
          for t in trials_of(tmp_path / 'replayed')] == [
      (p, 'llm', r) for p, r in zip(chosen, reasons, strict=True)]


@pytest.mark.parametrize('field, value, match', [
    ('backend', 'grpc', 'config.sweep.llm.backend='),
    ('max_attempts', 0, 'config.sweep.llm.max_attempts=0'),
    ('prompt', 'Propose hyperparameters for {dataset_size}: {space}',
     'config.sweep.llm.prompt'),
    ('model', '', 'config.sweep.llm.model'),
    ('replay_from', '', 'config.sweep.llm.replay_from='),
])
def test_bad_llm_settings_are_one_line_naming_the_field(field, value, match):
  config = llm_config('http://127.0.0.1:1/v1', **{field: value})
  if field == 'replay_from':
    config.sweep.llm.backend = 'replay'
  with pytest.raises(ValueError, match=re.escape(match)) as caught:
    SweepConfig.from_config(config)
  assert '\n' not in str(caught.value)


def _stage_refuses(config, workdir, match: str) -> None:
  """The stage fails with one line naming the field before any trial runs."""
  with pytest.raises(ValueError, match=re.escape(match)) as caught:
    stages.run(config, str(workdir))
  assert '\n' not in str(caught.value)
  assert not (workdir / 'trials').exists()


def test_stage_refuses_a_base_url_where_no_server_answers(dead_url, tmp_path):
  _stage_refuses(llm_config(dead_url), tmp_path / 'sweep', 'config.sweep.llm.base_url=')


def test_stage_refuses_an_api_key_env_that_is_not_set(stub, tmp_path, monkeypatch):
  monkeypatch.delenv(KEY_ENV, raising=False)
  _stage_refuses(llm_config(stub.base_url, api_key_env=KEY_ENV), tmp_path / 'sweep',
                 f'config.sweep.llm.api_key_env={KEY_ENV!r}')
  assert stub.requests == []


def test_replay_refuses_a_workdir_without_recorded_answers(dead_url, tmp_path):
  """An empty directory, and a study whose trials the LLM never proposed."""
  empty = tmp_path / 'empty'
  empty.mkdir()
  config = llm_config(dead_url, backend='replay', replay_from=str(empty))
  _stage_refuses(config, tmp_path / 'sweep1', 'config.sweep.llm.replay_from=')
  tpe = tmp_path / 'tpe'
  tpe.mkdir()
  study = optuna.create_study(study_name='sweep', storage=f'sqlite:///{tpe}/study.db')
  study.add_trial(optuna.trial.create_trial(
      params=VALID[0], distributions=SweepConfig.from_config(config).space.distributions(),
      value=1.0))
  config.sweep.llm.replay_from = str(tpe)
  _stage_refuses(config, tmp_path / 'sweep2', 'config.sweep.llm.replay_from=')

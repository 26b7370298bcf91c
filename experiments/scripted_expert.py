"""A scripted stand-in for an LLM hyperparameter advisor, served over the OpenAI chat API.

NOT a language model. It is a fixed heuristic that imitates what a sensible practitioner (and,
by the published comparisons, what an LLM mostly) does: start from the usual defaults (the
base config's values, which the prompt shows as "base"), then search locally around the best
trial so far, one parameter at a time, the learning rate most often, by factors on log
scales, halving the step in a direction that has already failed. It reads the space and the
history from the JSON sections of the project's default prompt (llmopt_jax/sweeps/prompt.py),
and answers in the required JSON, with a reason. It exists so that the `llm` sampler can be
measured end to end (HTTP, parsing, validation, retries, replay) where no LLM endpoint is
reachable; results obtained with it are labelled "scripted expert" wherever they are reported.

  python experiments/scripted_expert.py --port=8000     # then --config.sweep.llm.base_url=
                                                        # http://127.0.0.1:8000/v1, model=expert
"""

from __future__ import annotations

import hashlib
import http.server
import json
import math
import random
import re
import threading
from typing import Any

MODEL = 'scripted-expert'


def propose(messages: list[dict[str, str]]) -> str:
  """The expert's answer (JSON text) to a chat request of the default prompt."""
  prompt = next(m['content'] for m in messages if m['role'] == 'user')
  space, history, maximize = _read_prompt(prompt)
  rejected = sum(m['role'] == 'assistant' for m in messages)  # earlier answers refused
  rng = random.Random(hashlib.sha256(f'{prompt}{rejected}'.encode()).hexdigest())
  complete = [h for h in history if isinstance(h.get('value'), int | float)]
  if not complete and not rejected:
    params = {name: _default(d) for name, d in space.items()}
    return _answer(params, 'Start from the standard defaults for this kind of run.')
  tried = [h['params'] for h in history]
  best = (max if maximize else min)(complete, key=lambda h: h['value']) if complete else None
  start = best['params'] if best else {name: _default(d) for name, d in space.items()}
  for move in range(50):  # a new neighbour of the best; wider moves if all are taken
    name = _which(space, len(history) + rejected + move)
    params = dict(start)
    params[name], why = _step(name, space[name], start[name], history, best, maximize,
                              width=1 + move // len(space), rng=rng)
    if params not in tried:
      return _answer(params, why)
  return _answer({name: _random(d, rng) for name, d in space.items()}, 'Explore at random.')


def _read_prompt(prompt: str) -> tuple[dict[str, dict], list[dict], bool]:
  space, history = {}, []
  for line in prompt.splitlines():
    if not line.startswith('{'):
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if 'trial' in record:
      history.append(record)
    elif record and all(isinstance(v, dict) and 'type' in v for v in record.values()):
      space = record
  maximize = re.search(r'to (maximize|minimize)', prompt)
  return space, history, bool(maximize and maximize.group(1) == 'maximize')


def _which(space: dict[str, dict], k: int) -> str:
  """Every other move is the learning rate's (the field that matters most); the rest turn
  through the other parameters."""
  names = list(space)
  lr = next((n for n in names if n.endswith('.lr')), None)
  if lr and k % 2 == 0:
    return lr
  others = [n for n in names if n != lr] or names
  return others[(k // 2) % len(others)]


def _step(name: str, d: dict, value: Any, history: list[dict], best: dict | None,
          maximize: bool, width: int, rng: random.Random) -> tuple[Any, str]:
  """A move of `name` away from `value`: toward the side not yet found worse."""
  if d['type'] == 'categorical':
    choices = d['choices']
    i = choices.index(value) if value in choices else 0
    j = min(len(choices) - 1, max(0, i + rng.choice((-width, width))))
    j = j if j != i else (i + width) % len(choices)
    return choices[j], f'Try {name}={choices[j]} around the best trial.'
  worse_up, worse_down = _failed_sides(name, value, history, best, maximize)
  up = not worse_up if worse_up != worse_down else rng.random() < 0.5
  tried_both = worse_up and worse_down
  if d.get('log'):
    factor = (1.7 if tried_both else 3.0) ** (1 + 0.5 * (width - 1))
    new = value * factor if up else value / factor
  else:
    span = (d['high'] - d['low']) * (0.15 if tried_both else 0.3) * width
    new = value + span if up else value - span
  new = min(max(new, d['low']), d['high'])
  if d['type'] == 'int':
    step = d.get('step', 1)
    new = d['low'] + step * round((new - d['low']) / step)
  else:
    new = float(f'{new:.3g}')
  return new, (f'{"Raise" if up else "Lower"} {name} from the best trial\'s {value:.3g}'
               f'{", halving the step: both sides were worse" if tried_both else ""}.')


def _failed_sides(name: str, value: Any, history: list[dict], best: dict | None,
                  maximize: bool) -> tuple[bool, bool]:
  """Whether a trial with a higher / lower `name` (else like the best) did worse."""
  if best is None:
    return False, False
  up = down = False
  for h in history:
    if h is best or name not in h['params'] or not isinstance(h.get('value'), int | float):
      continue
    if h['params'][name] > value:
      up = True
    elif h['params'][name] < value:
      down = True
  return up, down


def _default(d: dict) -> Any:
  if 'base' in d and _inside(d, d['base']):
    return d['base']
  if d['type'] == 'categorical':
    return d['choices'][len(d['choices']) // 2]
  middle = (math.sqrt(d['low'] * d['high']) if d.get('log')
            else (d['low'] + d['high']) / 2)
  return round(middle) if d['type'] == 'int' else middle


def _inside(d: dict, value: Any) -> bool:
  if d['type'] == 'categorical':
    return value in d['choices']
  return isinstance(value, int | float) and d['low'] <= value <= d['high']


def _random(d: dict, rng: random.Random) -> Any:
  if d['type'] == 'categorical':
    return rng.choice(d['choices'])
  if d['type'] == 'int':
    return rng.randrange(d['low'], d['high'] + 1, d.get('step', 1))
  if d.get('log'):
    return math.exp(rng.uniform(math.log(d['low']), math.log(d['high'])))
  return rng.uniform(d['low'], d['high'])


def _answer(params: dict[str, Any], reason: str) -> str:
  return json.dumps({'params': params, 'reason': reason})


class _Handler(http.server.BaseHTTPRequestHandler):
  def do_GET(self) -> None:  # noqa: N802 (http.server's name)
    self._send({'object': 'list', 'data': [{'id': MODEL, 'object': 'model'}]})

  def do_POST(self) -> None:  # noqa: N802
    body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
    text = propose(body['messages'])
    self._send({'object': 'chat.completion', 'model': MODEL, 'choices': [
        {'index': 0, 'finish_reason': 'stop',
         'message': {'role': 'assistant', 'content': text}}],
        'usage': {'prompt_tokens': 0, 'completion_tokens': 0, 'total_tokens': 0}})

  def _send(self, record: dict) -> None:
    data = json.dumps(record).encode()
    self.send_response(200)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def log_message(self, *args: Any) -> None:
    del args


def start(port: int = 0) -> http.server.ThreadingHTTPServer:
  """The expert's server on 127.0.0.1:`port` (0 = a free one), in a daemon thread."""
  server = http.server.ThreadingHTTPServer(('127.0.0.1', port), _Handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server


if __name__ == '__main__':
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--port', type=int, default=8000)
  server = start(parser.parse_args().port)
  print(f'scripted expert (not an LLM) on http://127.0.0.1:{server.server_port}/v1')
  threading.Event().wait()

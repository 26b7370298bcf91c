"""Stage `serve`: one model behind an OpenAI-compatible HTTP API, until SIGINT or SIGTERM.

Chain: `config.model` (whatever `inference/loading.py` reads) -> a language model in an
`Engine` with its tokenizer and chat template, fed by a `GenerationBatcher` (continuous
batching), or a classifier fed by a `ClassificationBatcher` -> the FastAPI app of
`inference/server.py` -> uvicorn on config.serve.host:port.

The socket is bound and listening before <workdir>/server.json ({"url", "host", "port",
"pid", "model", "kind"}) is written, so a client that reads the file can connect at once
(with port 0, the file is how it learns the port); the file is removed when the server ends.
Stopping: on SIGINT or SIGTERM uvicorn stops accepting connections and lets the requests in
flight finish (up to config.serve.graceful_timeout_s), then the batcher's worker stops and the
run returns normally (exit code 0). Nothing trains, so a rerun simply serves again.
Fields: configs/serve.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from collections.abc import Iterator, Sequence

import jax
import ml_collections
import uvicorn

from llmopt_jax import report, sharding, workdir as workdir_lib
from llmopt_jax.inference import chat, classify, loading
from llmopt_jax.inference.batcher import ClassificationBatcher, GenerationBatcher
from llmopt_jax.inference.engine import Engine
from llmopt_jax.inference.sampling import SamplingParams
from llmopt_jax.inference.server import Served, create_app
from llmopt_jax.inference.text import TextGenerator

SERVER_JSON = 'server.json'


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  defaults = _checked(config)  # every bad field fails before the model loads
  workdir_lib.prepare(workdir, config)
  served = build(config, defaults)
  if config.serve.warm_up:
    served.batcher.warm_up()
  listening = bind(config.serve.host, config.serve.port)
  host, port = listening.getsockname()[:2]
  url = f'http://{f"[{host}]" if ":" in host else host}:{port}'
  address = os.path.join(workdir, SERVER_JSON)
  kind = 'language model' if isinstance(served.batcher, GenerationBatcher) else 'classifier'
  _write_json(address, {'url': url, 'host': host, 'port': port, 'pid': os.getpid(),
                        'model': served.name, 'kind': kind})
  report.say(f'Serving {served.name} ({kind}) at {url}/v1 (address in {address}); '
             f'SIGINT or SIGTERM stops it.')
  server = uvicorn.Server(uvicorn.Config(
      create_app(served), log_level=config.serve.log_level,
      timeout_graceful_shutdown=config.serve.graceful_timeout_s))
  served.batcher.start()
  try:
    with _signals_end_serving():
      server.run(sockets=[listening])
  finally:
    served.batcher.stop()
    listening.close()
    with contextlib.suppress(FileNotFoundError):
      os.remove(address)
  report.say(f'Stopped serving {served.name}.')


def build(config: ml_collections.ConfigDict, defaults: SamplingParams,
          devices: Sequence[jax.Device] | None = None) -> Served:
  """The model of `config.model` with its batcher (not started), on `devices` (all)."""
  mesh, rules = sharding.from_config(config.mesh, devices)
  model = loading.load(config.model, mesh, rules, dtype=config.dtype or None)
  name = config.serve.name or os.path.basename(os.path.normpath(config.model))
  engine_config = config.engine
  if model.kind == 'classifier':
    try:
      classifier = classify.Classifier(model, mesh, rules, batch_size=engine_config.max_batch,
                                       max_len=config.max_len)
    except ValueError as e:  # its messages name predict's fields
      raise ValueError(f'config.model={config.model} (a classifier, config.max_len='
                       f'{config.max_len}, batches of config.engine.max_batch='
                       f'{engine_config.max_batch}): {e}') from None
    return Served(name, ClassificationBatcher(classifier, queue_size=engine_config.queue_size,
                                              batch_rows=engine_config.max_batch))
  engine = Engine(model.graphdef, model.params, eos_ids=chat.model_end_ids(model),
                  max_batch=engine_config.max_batch,
                  max_prompt_tokens=engine_config.max_prompt_tokens,
                  max_new_tokens=engine_config.max_new_tokens)
  batcher = GenerationBatcher(TextGenerator(engine, model.tokenizer),
                              queue_size=engine_config.queue_size,
                              steps=engine_config.steps_per_round)
  return Served(name, batcher, chat.load(model.tokenizer_dir), defaults,
                default_seed=config.sampling.seed)


def bind(host: str, port: int) -> socket.socket:
  """A listening TCP socket on (host, port); port 0 picks a free one."""
  try:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family)
  except OSError as e:
    raise OSError(f'config.serve.host={host!r}, config.serve.port={port}: cannot listen '
                  f'there ({e.strerror or e})') from None


def _checked(config: ml_collections.ConfigDict) -> SamplingParams:
  """The default sampling, after checking every field the run reads."""
  if not config.model:
    raise ValueError('config.model is empty; name the model: configs/serve.py:model=<a Hugging '
                     'Face directory, a finished run or a ptq/qat variant>')
  if jax.process_count() > 1:
    raise ValueError('the serve stage runs in one process; start it without '
                     '--num_processes/--coordinator_address (a mesh of local devices is fine)')
  if config.max_len < 0:
    raise ValueError(f'config.max_len={config.max_len} must be at least 0')
  if config.dtype not in ('', 'float32', 'bfloat16'):
    raise ValueError(f"config.dtype={config.dtype!r}; choose from ('', 'float32', 'bfloat16')")
  for field in ('max_batch', 'max_prompt_tokens', 'max_new_tokens', 'queue_size',
                'steps_per_round'):
    if config.engine[field] < 1:
      raise ValueError(f'config.engine.{field}={config.engine[field]} must be at least 1')
  if not 0 <= config.serve.port < 2**16:
    raise ValueError(f'config.serve.port={config.serve.port} must lie in [0, 65535]')
  if config.sampling.max_new_tokens > config.engine.max_new_tokens:
    raise ValueError(f'config.sampling.max_new_tokens={config.sampling.max_new_tokens} exceeds '
                     f'config.engine.max_new_tokens={config.engine.max_new_tokens}')
  fields = {k: v for k, v in config.sampling.items() if k != 'seed'}
  try:
    return SamplingParams(**fields, seed=max(config.sampling.seed, 0))
  except ValueError as e:
    raise ValueError(f'config.{e}') from None


@contextlib.contextmanager
def _signals_end_serving() -> Iterator[None]:
  """While serving, SIGINT and SIGTERM only end the server (uvicorn's handlers, installed
  over these, shut it down gracefully). uvicorn raises the signal again once it has stopped,
  to reach the handler it replaced: here that is a no-op, so the run ends normally instead
  of dying of the signal (SIGTERM) or raising KeyboardInterrupt (SIGINT)."""
  previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def _write_json(path: str, record: dict) -> None:
  """Replaced atomically: a client polling for the file never reads half of it."""
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=2)
  os.replace(path + '.tmp', path)

"""Serve one model over an OpenAI-compatible HTTP API on this machine, until SIGINT/SIGTERM.

  python main.py --config=configs/serve.py:model=path/to/hf_llama --workdir=runs/serve
  python main.py --config=configs/serve.py:model=runs/lm --config.serve.port=8080 \
      --config.engine.max_batch=32 --config.engine.max_new_tokens=512 --workdir=runs/serve
  python main.py --config=configs/serve.py:model=runs/ft --workdir=runs/serve_clf  # classifier
  python main.py --config=configs/serve.py:tiny,model=path/to/hf_llama \
      --config.serve.port=0 --workdir=/tmp/serve          # small limits, any free port

  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \
      -d '{"prompt": "ROMEO:", "max_tokens": 32, "temperature": 0}'

Endpoints: /v1/completions, /v1/chat/completions (the checkpoint's chat template),
/v1/classify (classifiers), /v1/models, /v1/stats, /health; see llmopt_jax/inference/server.py.
<workdir>/server.json holds the address while the server runs (the port, when port=0).
Arguments (after the colon): model=<a Hugging Face causal LM or *ForSequenceClassification
directory, a finished pretrain / finetune_lm / finetune / distill workdir, or a ptq/qat variant
directory>, tiny, mesh=<data|fsdp|tensor|fsdp_tensor>.
"""

import ml_collections

from llmopt_jax import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configlib.parse_arg(arg, tiny=False, model='', mesh='data')
  config = ml_collections.ConfigDict()
  config.stage = 'serve'
  config.model = arg.model                 # the model (see the arguments above)
  config.dtype = ''                        # '' = as stored; 'bfloat16' halves memory
  # A classifier's tokens per text; 0 = its trained length (a Hugging Face Llama-family
  # classifier records none: set it).
  config.max_len = 0

  config.serve = ml_collections.ConfigDict()
  # Loopback only: the API has no authentication, so exposing it ('0.0.0.0') is a choice.
  config.serve.host = '127.0.0.1'
  config.serve.port = 8000                 # 0 = any free port, written to server.json
  config.serve.name = ''                   # the model id clients see; '' = its directory name
  config.serve.warm_up = True              # compile before listening: no slow first request
  config.serve.graceful_timeout_s = 30     # on SIGTERM, how long requests in flight may finish
  config.serve.log_level = 'warning'       # uvicorn's; 'info' logs every request

  config.engine = ml_collections.ConfigDict()
  config.engine.max_batch = 16             # rows decoded (or classified) together
  config.engine.max_prompt_tokens = 1024   # a longer prompt is a 400, not cut
  config.engine.max_new_tokens = 256       # the largest max_tokens a request may ask
  # Requests waiting for a slot; more get 503 + Retry-After instead of unbounded latency.
  config.engine.queue_size = 64
  # Decode steps between admissions: a new request waits at most this many for a free slot.
  config.engine.steps_per_round = 8

  # A request's sampling where it leaves a field out (OpenAI's defaults).
  config.sampling = ml_collections.ConfigDict()
  config.sampling.max_new_tokens = 64      # max_tokens
  config.sampling.temperature = 1.0
  config.sampling.top_k = 0                # 0 = off
  config.sampling.top_p = 1.0              # 1 = off
  config.sampling.seed = -1                # -1 = a fresh seed per request; >= 0 = reproducible
  config.mesh = configlib.mesh(arg.mesh)

  if arg.tiny:  # small buckets: a handful of programs that compile in seconds
    config.engine.update(max_batch=4, max_prompt_tokens=32, max_new_tokens=16, queue_size=16)
    config.sampling.max_new_tokens = 8
  return config

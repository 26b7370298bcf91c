"""Generate completions for a file of prompts with a language model, in batches.

  python main.py --config=configs/generate.py:model=runs/lm --workdir=runs/gen
  python main.py --config=configs/generate.py:model=path/to/hf_llama \
      --config.prompts=prompts.txt --config.sampling.temperature=0.8 \
      --config.sampling.top_p=0.95 --config.sampling.max_new_tokens=128 --workdir=runs/gen
  python main.py --config=configs/generate.py:model=runs/ptq_lm/ptq-int8 --workdir=runs/gen8
  python main.py --config=configs/generate.py:tiny --workdir=/tmp/gen              # seconds

Writes <workdir>/completions.jsonl (prompt, completion, tokens, logprob, finish_reason; one
line per prompt, in order) and summary.json (tokens/s, compiled programs).
Arguments (after the colon): model=<a Hugging Face causal LM directory, a finished pretrain or
finetune_lm workdir, or a ptq/qat variant directory of one; '' = pretrain one first in
<workdir>/source with configs/pretrain.py>, tiny, mesh=<data|fsdp|tensor|fsdp_tensor>.
Row i samples with seed `sampling.seed + i`, so every prompt has its own reproducible draw.
"""

import ml_collections

from llmopt_jax import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configlib.parse_arg(arg, tiny=False, model='', mesh='data')
  config = ml_collections.ConfigDict()
  config.stage = 'generate'
  config.task = 'lm'
  config.model = arg.model                 # the language model (see the arguments above)
  config.dtype = ''                        # '' = as stored; 'bfloat16' halves memory
  # The run that trains a model when `model` is '' (in <workdir>/source).
  config.source = configlib.sibling('pretrain', tiny=arg.tiny, mesh=arg.mesh)

  # A .txt file (one prompt per line, kept as written) or CSV/TSV/JSONL (`prompt_field`);
  # '' = the prompts below.
  config.prompts = ''
  config.prompt_field = 'prompt'
  config.prompt_list = ('ROMEO:', 'First Citizen:', 'KING HENRY:', 'To be, or not')

  config.sampling = ml_collections.ConfigDict()
  config.sampling.max_new_tokens = 64
  config.sampling.temperature = 0.0        # 0 = greedy
  config.sampling.top_k = 0                # 0 = off
  config.sampling.top_p = 1.0              # 1 = off
  config.sampling.seed = 0
  config.sampling.stop = ()                # strings that end a completion

  config.engine = ml_collections.ConfigDict()
  config.engine.batching = 'continuous'    # or 'static'
  config.engine.max_batch = 16             # rows decoded together
  config.engine.max_prompt_tokens = 512    # longer prompts are an error, not cut
  config.mesh = configlib.mesh(arg.mesh)

  if arg.tiny:
    config.sampling.max_new_tokens = 16
    config.engine.max_batch = 4
  return config

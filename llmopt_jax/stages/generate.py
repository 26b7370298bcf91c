"""Stage `generate`: completions for a list of prompts from a language model, in batches.

Chain: `config.model` (whatever `inference/loading.py` reads: a Hugging Face causal LM, a
finished pretrain or finetune_lm run, a ptq/qat variant of one; '' = pretrain one first in
<workdir>/source) -> the prompts (`config.prompts` file, or `config.prompt_list`) -> the
engine (`inference/engine.py`: KV cache, bucketed shapes, continuous or static batching) ->
completions.jsonl, one line per prompt in order:
  {"prompt", "completion", "tokens": [ids], "logprob": sum of the tokens' log-probabilities,
   "finish_reason": "stop" | "length", "prompt_tokens"}
and summary.json (prompts, new tokens, seconds, tokens/s, compiled programs). Nothing
trains, so a rerun generates again (deterministically: row i samples with seed
`sampling.seed + i`) and replaces both files.
Fields: configs/generate.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import ml_collections

from llmopt_jax import report, sharding, stages, workdir as workdir_lib
from llmopt_jax.data import utf8
from llmopt_jax.inference import chat, loading, text_rows
from llmopt_jax.inference.engine import Engine
from llmopt_jax.inference.sampling import SamplingParams
from llmopt_jax.inference.text import TextGenerator

OUTPUT = 'completions.jsonl'
BATCHINGS = ('continuous', 'static')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  workdir_lib.prepare(workdir, config)
  if config.engine.batching not in BATCHINGS:
    raise ValueError(f'config.engine.batching={config.engine.batching!r}; choose from '
                     f'{BATCHINGS}')
  prompts = read_prompts(config)
  params = sampling_params(config.sampling, len(prompts))  # bad settings fail before loading
  generator = text_generator(config, workdir)
  started = time.perf_counter()
  completions = generator.complete(prompts, params,
                                   continuous=config.engine.batching == 'continuous')
  seconds = time.perf_counter() - started
  _write_lines(os.path.join(workdir, OUTPUT), [c.to_json() for c in completions])
  new_tokens = sum(len(c.tokens) for c in completions)
  summary = {'prompts': len(prompts), 'new_tokens': new_tokens, 'seconds': seconds,
             'tokens_per_second': new_tokens / seconds, 'batching': config.engine.batching,
             'compiled_programs': generator.engine.stats['compiles']}
  with open(os.path.join(workdir, 'summary.json'), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=2)
  report.say(f'{len(prompts)} completions, {new_tokens} new tokens in {seconds:.1f} s '
             f'({new_tokens / seconds:.1f} tokens/s, {summary["compiled_programs"]} programs '
             f'compiled) -> {os.path.join(workdir, OUTPUT)}')
  return summary


def text_generator(config: ml_collections.ConfigDict, workdir: str) -> TextGenerator:
  """The model of `config.model` (trained first if '') inside an engine, with its tokenizer."""
  path = config.model or stages.finished_run('', 'config.model',
                                             os.path.join(workdir, 'source'), config.source, 'lm')
  mesh, rules = sharding.from_config(config.mesh)
  model = loading.load(path, mesh, rules, dtype=config.dtype or None)
  if model.kind != 'lm':
    raise ValueError(f'config.model={path!r} is a {model.kind}; generation needs a language '
                     f'model (classify texts with configs/predict.py)')
  engine = Engine(model.graphdef, model.params, eos_ids=chat.model_end_ids(model),
                  max_batch=config.engine.max_batch,
                  max_prompt_tokens=config.engine.max_prompt_tokens,
                  max_new_tokens=config.sampling.max_new_tokens)
  return TextGenerator(engine, model.tokenizer)


def sampling_params(section: ml_collections.ConfigDict, rows: int) -> list[SamplingParams]:
  """One `SamplingParams` per prompt: the config's, with seed + row; errors name the field."""
  fields = dict(section)
  fields['stop'] = tuple(fields.get('stop') or ())
  try:
    base = SamplingParams(**fields)
  except TypeError as e:
    raise ValueError(f'config.sampling: {e}') from None
  except ValueError as e:
    raise ValueError(f'config.{e}') from None
  return [dataclasses.replace(base, seed=base.seed + i) for i in range(rows)]


def read_prompts(config: ml_collections.ConfigDict) -> list[str]:
  """The prompts of `config.prompts` (.txt: a line each, kept as written but for the line
  end; CSV/TSV/JSONL: the `prompt_field` of each row), or `config.prompt_list`."""
  path = config.prompts
  if not path:
    prompts = list(config.prompt_list)
  elif not os.path.isfile(path):
    raise ValueError(f'config.prompts={path!r}: no such file')
  elif path.endswith('.txt'):
    prompts = [line for line in utf8.read_text(path).split('\n') if line.strip()]
  else:
    fmt = text_rows.file_format(path)
    prompts = list(text_rows.read_texts(path, fmt, config.prompt_field))
  if not prompts:
    raise ValueError(f'config.prompts={path!r}: no prompts in it' if path else
                     'config.prompt_list is empty and config.prompts is not set')
  return prompts


def _write_lines(path: str, records: list[dict]) -> None:
  """JSON Lines, replaced atomically: a killed run leaves the previous file whole."""
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(record, ensure_ascii=False) + '\n' for record in records)
  os.replace(path + '.tmp', path)

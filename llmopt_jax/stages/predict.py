"""Stage `predict`: a classifier over a file of texts, batched, resumable, on many devices and
processes.

Chain: `config.model` (whatever `inference/loading.py` reads: a finished run, a ptq/qat
variant, a Hugging Face directory) -> the texts of `config.data.path` (CSV, TSV or JSONL,
streamed: `inference/text_rows.py`) in shards of `config.shard_size` rows -> each shard
classified in batches of `config.batch_size` (`inference/classify.py`) and written atomically
as shards/<k>.jsonl -> predictions.jsonl (the shards in order) and summary.json.

Resuming: a shard whose file holds one line per row of the shard, indices in place, is not
classified again, so a killed run continues at its first unfinished shard and a finished one
only reassembles its output. Shards are counted in rows, not processes, so a run may resume on
a different number of processes.

Many processes: in round r, process p of P classifies shard r * P + p. Every process parses
the whole file (cheap beside the model) and encodes only its own rows; all run the same number
of batches per round (a process without work runs filler batches), since every batch is one
program over all devices. Process 0 assembles the output after a barrier; the processes share
the workdir (one filesystem, as for checkpoints).

predictions.jsonl, one JSON object per row of the file, in file order:
  {"index": 0-based row of the file, "text": the text as classified (stripped),
   "label": the most probable class, "probability": its probability,
   "top": [[class, probability], ...] the `config.top_k` most probable, descending (0 = all)}
Fields: configs/predict.py.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from llmopt_jax import distributed, report, sharding, workdir as workdir_lib
from llmopt_jax.inference import classify, loading, text_rows

SHARDS = 'shards'
OUTPUT = 'predictions.jsonl'
# Fields that decide what the shard files hold: a rerun must not mix two jobs' shards.
_JOB_FIELDS = ('model', 'dtype', 'max_len', 'data.path', 'data.format', 'data.text_field',
               'shard_size', 'top_k')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  fmt = _checked(config)  # every bad field fails before the model loads or anything is written
  _check_same_job(config, workdir)
  workdir_lib.prepare(workdir, config)
  started = time.perf_counter()
  mesh, rules = sharding.from_config(config.mesh)
  try:
    model = loading.load(config.model, mesh, rules, dtype=config.dtype or None)
  except (ValueError, FileNotFoundError) as e:
    raise type(e)(f'config.model: {e}') from None
  if model.kind != 'classifier':
    raise ValueError(f'config.model={config.model}: a language model; predict needs a '
                     f'classifier (a finetune or distill run, a ptq/qat variant of one, or a '
                     f'Hugging Face *ForSequenceClassification)')
  classifier = classify.Classifier(model, mesh, rules, batch_size=config.batch_size,
                                   max_len=config.max_len)
  report.say(f'Classifying {config.data.path} with {config.model} ({len(model.labels)} '
             f'classes{f", {model.quantized}" if model.quantized else ""}) in shards of '
             f'{config.shard_size} rows, batches of {config.batch_size}, on '
             f'{jax.device_count()} device(s).')
  loaded = time.perf_counter()
  rows, done = _classify_shards(config, workdir, fmt, classifier)
  done = np.sum(distributed.allgather_json(done), axis=0)  # [classified shards, their rows, reused]
  distributed.barrier('predict_shards_written')
  seconds = time.perf_counter() - loaded
  summary = {'rows': rows, 'shards': -(-rows // config.shard_size),
             'classified_shards': int(done[0]), 'reused_shards': int(done[2]),
             'seconds': seconds, 'examples_per_s': float(done[1] / max(seconds, 1e-9)),
             'load_seconds': loaded - started, 'model': config.model,
             'quantized': model.quantized, 'labels': list(model.labels),
             'output': os.path.join(workdir, OUTPUT)}
  if jax.process_index() == 0:
    _assemble(workdir, rows, config.shard_size)
    _write_json(os.path.join(workdir, 'summary.json'), summary)
  speed = (f'{summary["examples_per_s"]:.1f} examples/s over {seconds:.1f} s' if done[0]
           else 'nothing left to classify')
  report.say(f'{rows} rows in {summary["shards"]} shards ({summary["reused_shards"]} done '
             f'before): {speed}; predictions in {summary["output"]}')
  return summary


def _checked(config: ml_collections.ConfigDict) -> str:
  """The input's format, after checking every field the run reads."""
  if not config.model:
    raise ValueError('config.model is empty; name the classifier: configs/predict.py:model=<a '
                     'finished run, a ptq/qat variant or a Hugging Face directory>')
  if config.dtype not in ('', 'float32', 'bfloat16'):
    raise ValueError(f"config.dtype={config.dtype!r}; choose from ('', 'float32', 'bfloat16')")
  for field in ('batch_size', 'shard_size'):
    if config[field] < 1:
      raise ValueError(f'config.{field}={config[field]} must be at least 1')
  for field, value in (('max_len', config.max_len), ('top_k', config.top_k),
                       ('data.max_rows', config.data.max_rows)):
    if value < 0:
      raise ValueError(f'config.{field}={value} must be at least 0')
  fmt = text_rows.file_format(config.data.path, config.data.format)
  next(text_rows.read_texts(config.data.path, fmt, config.data.text_field), None)  # header
  return fmt


def _check_same_job(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A workdir holding shards of another job (another model, file, field, shard size) is
  refused: its shards would be taken for this job's."""
  path = os.path.join(workdir, workdir_lib.CONFIG)
  if not (os.path.isdir(os.path.join(workdir, SHARDS)) and os.path.exists(path)):
    return
  with open(path, encoding='utf-8') as f:
    old = ml_collections.ConfigDict(json.load(f))
  for name in _JOB_FIELDS:
    before, now = _lookup(old, name), _lookup(config, name)
    if before != now:
      raise ValueError(f'--workdir={workdir} holds predictions of another job (config.{name} '
                       f'was {before!r}); rerun with its values or give this run another '
                       f'--workdir')


def _lookup(config: ml_collections.ConfigDict, name: str) -> Any:
  """The value of a dotted field ('data.path'); None where a section or field is missing."""
  for key in name.split('.'):
    config = config.get(key) if isinstance(config, ml_collections.ConfigDict) else None
  return config


def _classify_shards(config: ml_collections.ConfigDict, workdir: str, fmt: str,
                     classifier: classify.Classifier) -> tuple[int, list[int]]:
  """Classifies this process's unfinished shards; (rows in the file, [shards classified,
  their rows, shards already done]) of this process."""
  processes, me = jax.process_count(), jax.process_index()
  texts = text_rows.read_texts(config.data.path, fmt, config.data.text_field)
  shards = _chunks(itertools.islice(texts, config.data.max_rows or None), config.shard_size)
  os.makedirs(os.path.join(workdir, SHARDS), exist_ok=True)
  rows, done, first = 0, [0, 0, 0], 0
  while True:
    group = list(itertools.islice(shards, processes))  # shards first, first + 1, ...
    rows += sum(map(len, group))
    mine = group[me] if me < len(group) else []
    path, start = _shard_path(workdir, first + me), (first + me) * config.shard_size
    todo = bool(mine) and not _is_complete(path, start, len(mine))
    batches = distributed.max_over_processes(classifier.num_batches(len(mine)) if todo else 0)
    if batches:
      probabilities = classifier.predict(mine if todo else [], num_batches=batches)
      if todo:
        _write_shard(path, start, mine, probabilities, classifier.labels, config.top_k)
    done = [done[0] + todo, done[1] + len(mine) * todo, done[2] + (bool(mine) and not todo)]
    if group:
      report.say(f'{rows} rows read, {first + len(group)} shards done.')
    if len(group) < processes:
      return rows, done
    first += processes


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
  while chunk := list(itertools.islice(items, size)):
    yield chunk


def _shard_path(workdir: str, shard: int) -> str:
  return os.path.join(workdir, SHARDS, f'{shard}.jsonl')


def _is_complete(path: str, start: int, count: int) -> bool:
  """Whether the shard's file holds its `count` rows, the first and last where they belong."""
  if not os.path.exists(path):
    return False
  with open(path, encoding='utf-8') as f:
    lines = f.read().splitlines()
  try:
    return (len(lines) == count and json.loads(lines[0])['index'] == start
            and json.loads(lines[-1])['index'] == start + count - 1)
  except (ValueError, KeyError, TypeError):
    return False  # a damaged shard is classified again


def _write_shard(path: str, start: int, texts: Sequence[str], probabilities: np.ndarray,
                 labels: Sequence[str], top_k: int) -> None:
  """One line per row (see the module docstring), replacing the file atomically."""
  top = np.argsort(-probabilities, axis=1, kind='stable')[:, :top_k or len(labels)]  # [n, k]
  lines = [json.dumps({
      'index': start + i, 'text': text, 'label': labels[best[0]],
      'probability': float(p[best[0]]),
      'top': [[labels[c], float(p[c])] for c in best]}, ensure_ascii=False)
      for i, (text, p, best) in enumerate(zip(texts, probabilities, top))]
  _replace(path, ''.join(line + '\n' for line in lines))


def _assemble(workdir: str, rows: int, shard_size: int) -> None:
  """predictions.jsonl from the shards in order, each checked to hold its rows."""
  path = os.path.join(workdir, OUTPUT)
  with open(path + '.tmp', 'wb') as out:
    for shard in range(-(-rows // shard_size)):
      with open(_shard_path(workdir, shard), 'rb') as f:
        data = f.read()
      lines, expected = data.count(b'\n'), min(shard_size, rows - shard * shard_size)
      if lines != expected:
        raise ValueError(f'{_shard_path(workdir, shard)}: {lines} lines where the shard has '
                         f'{expected} rows; delete it and rerun')
      out.write(data)
  os.replace(path + '.tmp', path)


def _write_json(path: str, record: dict[str, Any]) -> None:
  _replace(path, json.dumps(record, indent=2) + '\n')


def _replace(path: str, text: str) -> None:
  """Writes `text` to `path` atomically: a reader (or a rerun after a kill) sees the old
  file or the new one, never half of one."""
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(path + '.tmp', path)

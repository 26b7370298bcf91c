"""The predict stage and the loader behind it, on a tiny fine-tuned BERT classifier.

Properties: predictions are the fine-tune's own evaluation of the same texts (the same
encoding, the same weights, only padding cut away); the run's Hugging Face export, a
quantized variant and every mesh give the same engine the same answers; two processes write
what one process writes; a run killed with SIGKILL resumes without classifying a finished
shard again, and ends with every row exactly once, in order; bad input fails with one line
naming the field or path.
"""

import csv
import fcntl
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

import tolerances
from conftest import REPO, load_config, tiny_bert
from llmopt_jax import configlib, sharding, workdir as workdir_lib
from llmopt_jax.data import classification as classification_data, intents
from llmopt_jax.data.labelled import Split
from llmopt_jax.inference import classify, loading, text_rows
from llmopt_jax.quant import checkpoint, kernels, transform
from llmopt_jax.quant.config import QuantConfig
from llmopt_jax.stages import finetune, predict
from llmopt_jax.tasks import classification, starting_point

TIMEOUT_S = 240
ROWS = 600  # Banking77 test rows in the input file: 19 shards of 32 at the tiny settings


@pytest.fixture(scope='session')
def run(tmp_path_factory):
  """A finished 2-step tiny fine-tune of a 2-layer BERT (mean pooling, max_len 16), exported,
  and a CSV of Banking77 test queries: made once per test session, by the first xdist worker
  that asks (the others wait for it). The fine-tune has the settings of test_quant_stages's
  source run, so the two share compiled programs."""
  base = tmp_path_factory.getbasetemp()
  root = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / 'predict_run'
  config = load_config('finetune', 'tiny')
  config.test_batches = 1
  config.train.update(num_steps=2, eval_every=2, eval_batches=1)
  config.checkpoint.every_steps = 2
  config.init.model = str(root / 'bert')
  with open(f'{root}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not (root / 'ready').exists():
      shutil.rmtree(root, ignore_errors=True)
      tiny_bert(config.init.model)
      finetune.run(config, str(root / 'ft'))
      with open(os.path.join(intents.BANKING77_DIR, 'test.csv'), encoding='utf-8',
                newline='') as f:
        rows = list(csv.reader(f))[:ROWS + 1]
      with open(root / 'queries.csv', 'w', encoding='utf-8', newline='') as f:
        csv.writer(f).writerows(rows)
      (root / 'ready').touch()
  return config, str(root / 'ft'), str(root / 'queries.csv')


@functools.cache
def _model(path: str, preset: str = 'data', devices: int = 8):
  """(the model at `path` on the mesh, mesh, rules), loaded once per test process."""
  mesh, rules = sharding.from_config(configlib.mesh(preset), jax.devices()[:devices])
  return loading.load(path, mesh, rules), mesh, rules


@functools.cache
def _engine(path: str, max_len: int = 16, preset: str = 'data', devices: int = 8):
  """A Classifier of batches of 16 (its programs compiled once per test process)."""
  model, mesh, rules = _model(path, preset, devices)
  return classify.Classifier(model, mesh, rules, batch_size=16, max_len=max_len)


def _tolerance(model: loading.LoadedModel, length: int) -> float:
  """Probabilities of two float32 programs that sum the forward pass's terms in other orders:
  the softmax moves each by at most twice the logits' error, and this barely trained model's
  logits lie below 1 in size (`_logits` checks it wherever they are computed)."""
  terms = tolerances.forward_terms(model.config, length) + len(model.labels)
  return 2 * tolerances.sum_tolerance(terms, 1.0)


def _softmax(logits) -> np.ndarray:
  return np.asarray(jax.nn.softmax(np.asarray(logits, np.float32), axis=-1))


def _logits(model: loading.LoadedModel, params, batch) -> np.ndarray:
  """The classifier's logits as a fine-tune's evaluation computes them (one jitted call)."""
  logits = np.asarray(jax.jit(lambda params, batch: classification.classifier_logits(
      nnx.merge(model.graphdef, params), batch))(params, batch))
  assert np.abs(logits).max() < 1, 'the tolerances assume logits below 1'
  return logits


def _queries(count: int, start: int = 0) -> list[str]:
  return list(intents.banking77().splits['test'].texts[start:start + count])


def test_predictions_are_the_fine_tunes_own_evaluation(run):
  """The fine-tune's test batch (its encoder, its max_len) through the restored model gives
  the probabilities the engine gives for the same texts; the accuracy of the engine's labels
  on those rows is the accuracy the fine-tune reported."""
  config, ft, _ = run
  model = _model(ft)[0]
  assert (model.kind, model.max_len, model.quantized) == ('classifier', 16, None)
  built = classification.fine_tuning(config, None)
  assert model.labels == built.splits.label_names
  order = np.random.default_rng(0).permutation(len(built.splits['test']))  # its test subset
  texts = [built.splits['test'].texts[i] for i in order[:config.train.batch_size]]
  batch = built.test[0]
  got = _engine(ft).predict(texts)
  tolerances.assert_close(got, _softmax(_logits(model, model.params, batch)),
                          _tolerance(model, 16), 'engine vs eval')
  with open(os.path.join(ft, 'report.json'), encoding='utf-8') as f:
    reported = json.load(f)['accuracy']
  assert np.mean(got.argmax(1) == batch['labels']) == pytest.approx(reported, abs=1e-9)


def test_export_and_length_buckets_match_the_run(run):
  """The run's Hugging Face export (a base BERT + head.json: mean pooling) loads as the same
  classifier. At max_len 32 a batch is cut to 16 tokens when its texts fit (then it is the
  run's own program) or kept at 32, and either way equals the uncut 32-token batch."""
  config, ft, _ = run
  card, export = _model(ft)[0], _model(os.path.join(ft, 'export'))[0]
  assert (export.kind, export.labels, export.max_len) == ('classifier', card.labels, 32)
  engine = _engine(os.path.join(ft, 'export'), max_len=32)
  assert engine.lengths == (16, 32)
  short = [t for t in _queries(200) if len(t.split()) <= 6][:16]  # under 16 tokens each
  tolerances.assert_close(engine.predict(short), _engine(ft).predict(short),
                          _tolerance(card, 16), 'export vs run')
  texts = _queries(40)  # Banking77's first queries: some over 16 tokens
  encode = starting_point.resolve(config).encoder(32)  # the fine-tune's own encoder
  full = classification_data.eval_batches(Split(tuple(texts), np.zeros(40, np.int32)), encode,
                                          batch_size=40)[0]
  assert full['padding_mask'][:, 16:].any()
  tolerances.assert_close(engine.predict(texts),
                          _softmax(_logits(export, export.params, full)),
                          _tolerance(card, 32), 'bucketed vs full length')


def test_one_device_equals_eight_devices_and_fsdp(run):
  """The batch split over 8 devices, and the parameters split over 8 too (fsdp), predict what
  one device predicts."""
  _, ft, _ = run
  texts = _queries(50)
  one = _engine(ft, devices=1).predict(texts)
  for preset in ('data', 'fsdp'):
    got = _engine(ft, preset=preset).predict(texts)
    tolerances.assert_close(got, one, _tolerance(_model(ft)[0], 16), preset)
    np.testing.assert_array_equal(got.argmax(1), one.argmax(1))


def _config(ft: str, path: str):
  config = load_config('predict', f'tiny,model={ft}')
  config.data.path, config.data.max_rows = path, 0
  return config


def _command(ft: str, path: str, workdir, *flags: str) -> list[str]:
  return [sys.executable, 'main.py', f'--config=configs/predict.py:tiny,model={ft}',
          f'--config.data.path={path}', '--config.data.max_rows=0', f'--workdir={workdir}',
          *flags]


def _env(devices: int, processes: int = 1) -> dict:
  """The caller's XLA flags (an instruction-set cap, say) with this run's device count."""
  flags = [flag for flag in os.environ.get('XLA_FLAGS', '').split()
           if not flag.startswith('--xla_force_host_platform_device_count')]
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=' '.join(
      [*flags, f'--xla_force_host_platform_device_count={devices}']))
  if processes > 1:  # as tests/test_multiprocess.py: no shared compilation cache across them
    env.pop('JAX_COMPILATION_CACHE_DIR', None)
  return env


def _read(workdir) -> list[dict]:
  with open(os.path.join(workdir, predict.OUTPUT), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _two_processes(ft: str, path: str, workdir) -> list[subprocess.Popen]:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  return [subprocess.Popen(
      _command(ft, path, workdir, f'--coordinator_address=localhost:{port}',
               '--num_processes=2', f'--process_id={i}'),
      cwd=REPO, env=_env(4, processes=2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]


def _kill_after_first_shard(ft: str, path: str, workdir) -> dict[str, int]:
  """Runs main.py on 8 devices, SIGKILLs it as soon as its first shard file lands; returns
  the shard files it left (name -> modification time)."""
  shards = workdir / predict.SHARDS
  proc = subprocess.Popen(_command(ft, path, workdir), cwd=REPO, env=_env(8),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while not (shards / '0.jsonl').exists() and proc.poll() is None:
      assert time.monotonic() < deadline, 'no shard written in time'
      time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=TIMEOUT_S)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL, stderr[-3000:]  # killed, not finished
  return {p.name: p.stat().st_mtime_ns for p in shards.glob('*.jsonl')}


def test_a_killed_and_resumed_process_writes_what_two_processes_write(run, tmp_path):
  """Two processes of 4 devices classify alternate shards (the last round leaves process 1
  without one, so it runs filler batches in step). Meanwhile one process of 8 devices is
  SIGKILLed once its first shard file lands; rerun, it keeps the shards already written (their
  files untouched) and classifies the rest. Both end with every row exactly once, in order,
  with the same labels and probabilities."""
  _, ft, path = run
  procs = _two_processes(ft, path, tmp_path / 'two')  # runs while the other one is killed
  try:
    written = _kill_after_first_shard(ft, path, tmp_path / 'one')
    outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
  finally:
    for p in procs:  # a hung collective must not outlive the test
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  shards = tmp_path / 'one' / predict.SHARDS
  assert 1 <= len(written) < 19 and not (tmp_path / 'one' / predict.OUTPUT).exists(), written

  summary = predict.run(_config(ft, path), str(tmp_path / 'one'))
  assert (summary['reused_shards'], summary['classified_shards']) == (
      len(written), 19 - len(written))
  assert {name: (shards / name).stat().st_mtime_ns for name in written} == written
  got, want = _read(tmp_path / 'one'), _read(tmp_path / 'two')
  assert [r['index'] for r in got] == [r['index'] for r in want] == list(range(ROWS))
  assert [r['text'] for r in got] == [r['text'] for r in want]
  assert [r['label'] for r in got] == [r['label'] for r in want]
  tolerances.assert_close([[p for _, p in r['top']] for r in got],
                          [[p for _, p in r['top']] for r in want],
                          _tolerance(_model(ft)[0], 16), 'one process vs two')


def test_a_quantized_variant_runs_through_the_same_engine(run, tmp_path):
  """An int8 variant as the ptq stage writes it (ptq-int8/ in a ptq workdir whose source is
  the run) loads as integer kernels and predicts what the in-memory quantized model does."""
  config, ft, _ = run
  source, mesh, rules = _model(ft)
  ptq_config = load_config('ptq', 'tiny')
  ptq_config.source.workdir = ft
  workdir_lib.prepare(str(tmp_path), ptq_config)
  recipe = QuantConfig(bits=8)
  quantized = transform.quantize(source.params, recipe)
  checkpoint.save(str(tmp_path / 'ptq-int8'), quantized, recipe, {'variant': 'int8 PTQ'})

  variant = loading.load(str(tmp_path / 'ptq-int8'), mesh, rules)
  assert (variant.kind, variant.quantized, variant.labels) == ('classifier', 'int8',
                                                               source.labels)
  up = variant.params['backbone']['blocks'][0]['mlp']['up'].get_value()
  assert isinstance(up, kernels.QuantizedKernel)
  texts = _queries(32)
  encode = starting_point.resolve(config).encoder(16)
  batch = classification_data.eval_batches(Split(tuple(texts), np.zeros(32, np.int32)), encode,
                                           batch_size=32)[0]
  got = classify.Classifier(variant, mesh, rules, batch_size=16).predict(texts)
  tolerances.assert_close(got, _softmax(_logits(source, quantized, batch)),
                          _tolerance(source, 16), 'variant')
  with pytest.raises(ValueError, match=r'workdir of the ptq stage.*ptq-int8'):
    loading.load(str(tmp_path), mesh, rules)


@pytest.mark.parametrize('case', ['csv_field', 'jsonl_field', 'extension', 'format',
                                  'not_a_model', 'unfinished', 'batch'])
def test_bad_input_fails_with_one_line_naming_it(run, tmp_path, case):
  _, ft, path = run
  config = _config(ft, path)
  jsonl = tmp_path / 'q.jsonl'
  jsonl.write_text('{"text": "where is my card?"}\n{"query": "hello"}\n', encoding='utf-8')
  unfinished = tmp_path / 'unfinished'
  unfinished.mkdir()
  (unfinished / 'config.json').write_text('{"stage": "finetune"}', encoding='utf-8')
  change, pattern = {
      'csv_field': ({'data.text_field': 'query'}, r"column 'query' .*data.text_field.* not in"),
      'jsonl_field': ({'data.path': str(jsonl)}, r'q.jsonl, line 2: no field .text.'),
      'extension': ({'data.path': str(tmp_path / 'q.txt')}, r'data.format=auto.*q.txt'),
      'format': ({'data.format': 'xml'}, r"config.data.format='xml'"),
      'not_a_model': ({'model': str(tmp_path)}, r'config.model: .*not a model; expected'),
      'unfinished': ({'model': str(unfinished)}, r'finetune run has not finished'),
      'batch': ({'batch_size': 12}, r'config.batch_size=12 .*8 devices'),
  }[case]
  for field, value in change.items():
    section, _, name = field.rpartition('.')
    (config[section] if section else config)[name] = value
  (tmp_path / 'q.txt').write_text('text\nhello\n', encoding='utf-8')
  with pytest.raises(ValueError, match=pattern) as error:
    predict.run(config, str(tmp_path / 'out'))
  assert '\n' not in str(error.value)


def test_reader_streams_csv_and_jsonl_strictly(tmp_path):
  """Quoted line breaks stay in their text, a BOM is dropped, blank lines are skipped, and a
  bad byte or an open quote names its line."""
  good = tmp_path / 'a.csv'
  good.write_bytes(b'\xef\xbb\xbfid,text\n1," two\nlines "\n\n2,plain\n')
  assert list(text_rows.read_texts(str(good), 'csv', 'text')) == ['two\nlines', 'plain']
  tsv = tmp_path / 'a.tsv'
  tsv.write_text('text\tlabel\nhello there\tx\n', encoding='utf-8')
  assert list(text_rows.read_texts(str(tsv), text_rows.file_format(str(tsv)), 'text')) == [
      'hello there']
  for content, pattern in ((b'text\nok\nbad \xff byte\n', r'line 3: not UTF-8'),
                           (b'text\nok\n"open\n', r'line 3: a quote opened'),
                           (b'a,text\n1,x\n2\n', r'line 3: 1 fields')):
    bad = tmp_path / 'bad.csv'
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=pattern):
      list(text_rows.read_texts(str(bad), 'csv', 'text'))
  lines = tmp_path / 'a.jsonl'
  lines.write_text('{"text": "a"}\n\n{"text": 3}\n', encoding='utf-8')
  with pytest.raises(ValueError, match=r'line 3: field .text. holds 3'):
    list(text_rows.read_texts(str(lines), 'jsonl', 'text'))

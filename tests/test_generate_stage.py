"""The `generate` stage on a finished tiny pretrain run, and integer weights in the engine.

The stage: one completion per prompt, in order, decoded from its own tokens; static and
continuous batching write the same file; a stop string cuts a completion where the text first
holds it; bad settings fail with one line naming the field. The engine on int8 kernels: the
KV-cache path generates what recomputing the whole sequence at every step generates.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_config, load_finished
from llmopt_jax import stages
from llmopt_jax.data import tokenizers
from llmopt_jax.inference.engine import Engine
from llmopt_jax.inference.sampling import SamplingParams
from llmopt_jax.quant import config as quant_config, transform

PROMPTS = ['ROMEO:', 'First Citizen:\tWe are', 'A', 'KING RICHARD III:  Now is the winter ']


def _generate(workdir, tmp_path, name, **fields):
  (tmp_path / 'prompts.txt').write_text('\n'.join(PROMPTS) + '\n', encoding='utf-8')
  config = load_config('generate', f'tiny,model={workdir}')
  config.prompts = str(tmp_path / 'prompts.txt')
  for key, value in fields.items():
    section, field = key.split('__') if '__' in key else (None, key)
    (config[section] if section else config)[field] = value
  out = tmp_path / name
  stages.run(config, str(out))
  with open(out / 'completions.jsonl', encoding='utf-8') as f:
    return [json.loads(line) for line in f]


# Sampled, not greedy: the 6-step model's greedy text repeats one character, and a sampled
# run checks that a row's seed, not its batch, decides its draw.
SAMPLED = dict(sampling__temperature=1.0, sampling__top_k=40)


@pytest.fixture(scope='module')
def sampled(pretrain_workdir, tmp_path_factory):
  return _generate(pretrain_workdir, tmp_path_factory.mktemp('gen'), 'continuous', **SAMPLED)


def test_a_completion_per_prompt_in_order_decoded_from_its_tokens(sampled):
  tokenizer = tokenizers.ByteTokenizer()  # the tiny pretrain run's
  max_new = load_config('generate', 'tiny').sampling.max_new_tokens
  assert [row['prompt'] for row in sampled] == PROMPTS
  for row in sampled:
    assert row['completion'] == tokenizer.decode(row['tokens'])
    assert row['prompt_tokens'] == len(tokenizer.encode(row['prompt']))
    ended = row['tokens'][-1] == tokenizer.eos_id
    assert row['finish_reason'] == ('stop' if ended else 'length')
    assert len(row['tokens']) == max_new or ended
    assert row['logprob'] < 0


def test_static_batching_writes_the_same_completions(sampled, pretrain_workdir, tmp_path):
  static = _generate(pretrain_workdir, tmp_path, 'static', engine__batching='static',
                     engine__max_batch=2, **SAMPLED)
  # Other batch shapes may round the float32 log-probabilities differently in the last bit.
  drop = lambda rows: [{k: v for k, v in r.items() if k != 'logprob'} for r in rows]
  assert drop(static) == drop(sampled)
  np.testing.assert_allclose([r['logprob'] for r in static], [r['logprob'] for r in sampled],
                             rtol=1e-5)


def test_a_stop_string_cuts_the_completion_before_it(sampled, pretrain_workdir, tmp_path):
  row = next(r for r in sampled if len(set(r['completion'])) > 1)
  stop = row['completion'][3:5]  # two characters of a completion, first seen at index <= 3
  cut = row['completion'].index(stop)
  rows = _generate(pretrain_workdir, tmp_path, 'stop', sampling__stop=(stop,), **SAMPLED)
  stopped = rows[PROMPTS.index(row['prompt'])]
  assert stopped['completion'] == row['completion'][:cut]
  assert stopped['finish_reason'] == 'stop'
  # The tokens are those generated up to the one that completed the stop string.
  assert stopped['tokens'] == row['tokens'][:len(stopped['tokens'])]
  assert stop in tokenizers.ByteTokenizer().decode(stopped['tokens'])


def test_int8_weights_generate_through_the_cache_as_by_full_recomputation(pretrain_workdir):
  graphdef, params = load_finished(pretrain_workdir)
  quantized = transform.quantize(params, quant_config.QuantConfig(bits=8))
  quantized = jax.device_put(quantized, jax.devices()[0])
  engine = Engine(graphdef, quantized, eos_ids=[], max_batch=2, max_new_tokens=16)
  prompt = np.frombuffer(b'ROMEO:', np.uint8).astype(np.int32)
  cached = engine.generate([prompt], [SamplingParams(max_new_tokens=8)])[0].tokens
  model = nnx.merge(graphdef, quantized)
  forward = nnx.jit(lambda m, tokens: m(tokens)[0])
  # No cache: the whole sequence through the model for each new token. One fixed-length
  # buffer (one compile); causal attention keeps the unfilled tail out of earlier positions.
  tokens = np.zeros(len(prompt) + 8, np.int32)
  tokens[:len(prompt)] = prompt
  for n in range(len(prompt), len(tokens)):
    tokens[n] = int(jnp.argmax(forward(model, jnp.asarray(tokens[None]))[n - 1]))
  assert list(cached) == list(tokens[len(prompt):])


@pytest.mark.parametrize('field,value,message', [
    ('sampling__temperature', -1.0, 'config.sampling.temperature must be'),
    ('sampling__max_new_tokens', 0, 'config.sampling.max_new_tokens must be'),
    ('engine__batching', 'dynamic', 'config.engine.batching'),
    ('prompts', '/nonexistent/prompts.txt', 'config.prompts'),
])
def test_bad_settings_fail_naming_the_field(field, value, message, tmp_path):
  config = load_config('generate', 'tiny,model=/nonexistent')
  section, name = field.split('__') if '__' in field else (None, field)
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=message):
    stages.run(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'completions.jsonl')


def test_a_classifier_is_refused(tiny_bert_dir, tmp_path):
  config = load_config('generate', f'tiny,model={tiny_bert_dir}')
  with pytest.raises(ValueError, match='config.model|not a|classifier|base'):
    stages.run(config, str(tmp_path / 'run'))

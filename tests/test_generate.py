"""The generation engine: parity with transformers' `generate`, the KV cache against the full
forward pass, bounded compilation, continuous == static batching, and sampling's laws.

Greedy parity: tiny random Llama, Qwen2, Mistral (a window shorter than the output) and GPT-2
checkpoints, prompts of mixed lengths left-padded in one batch. Two float32 implementations
may legitimately pick different tokens only where the two best logits tie to within their
rounding; the comparison stops a row there, and checks that it was such a tie.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tolerances
from llmopt_jax import hf
from llmopt_jax.inference import sampling
from llmopt_jax.inference.engine import Engine, bucket
from llmopt_jax.inference.sampling import SamplingParams
from llmopt_jax.models import config as model_config, kv_cache
from llmopt_jax.models.transformer import Transformer

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

V, EOS, NEW = 96, 5, 20
PROMPT_LENGTHS = (3, 9, 17, 6)
_LLAMA = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0,
              eos_token_id=EOS, pad_token_id=0, bos_token_id=1)
CASES = {
    'llama': ('LlamaForCausalLM', 'LlamaConfig', dict(_LLAMA, tie_word_embeddings=False)),
    'qwen2': ('Qwen2ForCausalLM', 'Qwen2Config', dict(_LLAMA, tie_word_embeddings=True)),
    'mistral_window': ('MistralForCausalLM', 'MistralConfig',
                       dict(_LLAMA, sliding_window=6, head_dim=16)),
    'gpt2': ('GPT2LMHeadModel', 'GPT2Config',
             dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                  eos_token_id=EOS, pad_token_id=0, bos_token_id=1)),
}


def _prompts(seed: int = 0, lengths=PROMPT_LENGTHS) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(6, V, n).astype(np.int32) for n in lengths]


@pytest.fixture(scope='module', params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
  """(transformers model, our engine) of one tiny random checkpoint."""
  cls, config_cls, fields = CASES[request.param]
  torch.manual_seed(0)
  reference = getattr(transformers, cls)(getattr(transformers, config_cls)(**fields)).eval()
  with torch.no_grad():  # HF initialises biases to 0 and gains to 1: perturb every tensor
    for p in reference.parameters():
      p.add_(0.1 * torch.randn_like(p))
  directory = tmp_path_factory.mktemp(request.param)
  reference.save_pretrained(directory, safe_serialization=True)
  model, _ = hf.load_pretrained(str(directory))
  graphdef, params = nnx.split(model, nnx.Param)
  return reference, Engine(graphdef, params, eos_ids=[EOS], max_batch=4, max_new_tokens=32)


def _transformers_generate(reference, prompts):
  """Left-padded greedy `generate`: new tokens and the scores [rows, steps, V] it chose from."""
  width = max(len(p) for p in prompts)
  ids = np.zeros((len(prompts), width), np.int64)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
  with torch.no_grad():
    out = reference.generate(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=NEW,
        do_sample=False, eos_token_id=EOS, pad_token_id=0, output_scores=True,
        return_dict_in_generate=True)
  scores = torch.stack(out.scores, dim=1).numpy()
  return out.sequences[:, width:].numpy(), scores


def _assert_greedy_agrees(ours, theirs, scores, tol):
  """Row by row, token by token; at a difference the two candidates must have tied."""
  for row, generated in enumerate(ours):
    for t, token in enumerate(generated.tokens):
      if token != theirs[row, t]:
        s = scores[row, t]
        margin = abs(s[token] - s[theirs[row, t]]) / np.abs(s).max()
        assert margin < tol, (row, t, token, theirs[row, t], margin)
        break
    else:
      n = len(generated.tokens)  # they stopped at the same place: EOS or the limit
      assert n == NEW or (generated.tokens[-1] == EOS and generated.finish_reason == 'stop')
      assert np.all(theirs[row, n:] == 0), 'transformers went on past our stop'


def test_greedy_generation_matches_transformers(checkpoint):
  """Static and continuous batching both: the same tokens as `generate`, and log-probs that
  are transformers' log-softmax of its own scores."""
  reference, engine = checkpoint
  prompts = _prompts()
  theirs, scores = _transformers_generate(reference, prompts)
  tol = tolerances.sum_tolerance(tolerances.forward_terms(engine.config, 64), 1.0)
  for continuous in (False, True):
    ours = engine.generate(prompts, [SamplingParams(max_new_tokens=NEW)] * len(prompts),
                           continuous=continuous)
    _assert_greedy_agrees(ours, theirs, scores, tol)
    for row, generated in enumerate(ours):
      n = min(len(generated.tokens), 3)
      expected = torch.log_softmax(torch.tensor(scores[row, :n]), -1).numpy()
      np.testing.assert_allclose(
          generated.logprobs[:n], expected[np.arange(n), generated.tokens[:n]], atol=1e-4)


def test_cached_decode_logits_equal_the_full_forward_at_every_position():
  """Prefill a left-padded prompt, then feed the rest one token at a time: each step's
  logits are the full forward pass's at that position."""
  config = model_config.get_preset('tiny', sliding_window=5)
  model = Transformer(config, rngs=nnx.Rngs(0))
  rows, length, prefix = 3, 14, 6
  tokens = jax.random.randint(jax.random.key(1), (rows, length), 0, config.vocab_size)
  full = model(tokens)
  pad = 2  # the prefix is left-padded by 2 slots in the cache; positions stay 0..
  cache = kv_cache.empty(config, rows, pad + length)
  padded = jnp.concatenate([jnp.zeros((rows, pad), jnp.int32), tokens[:, :prefix]], axis=1)
  mask = jnp.concatenate([jnp.zeros((rows, pad)), jnp.ones((rows, prefix))], axis=1)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
  decode = nnx.jit(lambda m, *args, **kw: m.decode(*args, **kw))
  logits, cache = decode(model, padded, positions=positions, token_mask=mask, cache=cache)
  steps = [logits]
  for t in range(prefix, length - 1):
    logits, cache = decode(model, tokens[:, t:t + 1], positions=jnp.full((rows, 1), t),
                           token_mask=jnp.ones((rows, 1)), cache=cache)
    steps.append(logits)
  cached = jnp.stack(steps, axis=1)  # logits at positions prefix-1 .. length-2
  reference = full[:, prefix - 1:length - 1]
  tol = tolerances.sum_tolerance(tolerances.forward_terms(config, length), 1.0)
  assert float(jnp.max(jnp.abs(cached - reference)) / jnp.max(jnp.abs(reference))) < tol


def test_twenty_prompt_lengths_compile_a_handful_of_programs():
  """Prompts of 20 lengths (1..60 tokens) one at a time: prompt lengths fall in 3 buckets
  (16, 32, 64); each bucket needs one prefill and one decode loop for static batching, and
  one prefill, one decode loop and one slot insert for continuous."""
  config = model_config.get_preset('tiny')
  graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)
  engine = Engine(graphdef, params, eos_ids=[257], max_batch=2, max_new_tokens=16)
  lengths = np.linspace(1, 60, 20).astype(int)
  prompts = _prompts(1, lengths)
  buckets = {bucket(n) for n in lengths}
  assert len(buckets) == 3
  for prompt in prompts:
    engine.generate([prompt], [SamplingParams(max_new_tokens=4)], continuous=False)
  assert engine.stats['compiles'] <= 2 * len(buckets)
  before = engine.stats['compiles']
  for prompt in prompts:
    engine.generate([prompt], [SamplingParams(max_new_tokens=4)], continuous=True)
  assert engine.stats['compiles'] - before <= 3 * len(buckets)


def test_continuous_batching_returns_the_static_results():
  """12 requests of mixed prompt and output lengths, greedy and sampled, through 4 slots:
  every request gets exactly the tokens a static batch gives it."""
  config = model_config.get_preset('tiny')
  graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(3)), nnx.Param)
  engine = Engine(graphdef, params, eos_ids=[7], max_batch=4, max_new_tokens=64)
  rng = np.random.default_rng(0)
  prompts = _prompts(2, rng.integers(1, 30, 12))
  settings = [SamplingParams(max_new_tokens=int(rng.integers(2, 40)),
                             temperature=float(i % 3) * 0.7, top_k=(0, 20)[i % 2],
                             top_p=(1.0, 0.9)[i % 4 // 2], seed=i) for i in range(12)]
  static = engine.generate(prompts, settings, continuous=False)
  continuous = engine.generate(prompts, settings, continuous=True)
  for a, b in zip(static, continuous, strict=True):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.finish_reason == b.finish_reason
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
  assert engine.stats['max_rows'] == 4  # the slots were all in use at once


def _settings(rows, **kw):
  return {k: jnp.asarray(v) for k, v in sampling.row_settings(
      [SamplingParams(**kw)] * rows, rows).items()}


LOGITS = jnp.asarray(np.random.default_rng(0).normal(size=(1, 12)) * 2, jnp.float32)


def _draws(n=4000, **kw):
  logits = jnp.broadcast_to(LOGITS, (n, LOGITS.shape[1]))
  settings = {k: jnp.broadcast_to(v, (n,)) for k, v in _settings(1, **kw).items()}
  token, logprob = jax.jit(sampling.sample)(logits, settings, jnp.arange(n))
  return np.asarray(token), np.asarray(logprob)


def test_sampling_at_temperature_one_follows_the_softmax():
  tokens, logprobs = _draws(temperature=1.0)
  probs = np.asarray(jax.nn.softmax(LOGITS[0]))
  counts = np.bincount(tokens, minlength=len(probs))
  # Each count is Binomial(n, p): within 5 standard deviations (1 in 3.5 million per cell).
  n = len(tokens)
  assert np.all(np.abs(counts - n * probs) <= 5 * np.sqrt(n * probs * (1 - probs)) + 1)
  np.testing.assert_allclose(logprobs, np.log(probs)[tokens], rtol=1e-5)


def test_top_k_and_top_p_keep_only_their_sets():
  ranked = np.argsort(-np.asarray(LOGITS[0]))
  tokens, _ = _draws(temperature=1.5, top_k=3)
  assert set(tokens) == set(ranked[:3])
  probs = np.sort(np.asarray(jax.nn.softmax(LOGITS[0])))[::-1]
  p = float(probs[:2].sum()) - 1e-3  # the two best are the smallest set holding p
  tokens, _ = _draws(temperature=1.0, top_p=p)
  assert set(tokens) == set(ranked[:2])
  greedy = int(ranked[0])
  for kw in (dict(top_k=1), dict(top_p=1e-6), dict()):
    tokens, _ = _draws(n=50, temperature=2.0 if kw else 0.0, **kw)
    assert set(tokens) == {greedy}


def test_a_seed_fixes_the_sample_and_seeds_differ():
  a, _ = _draws(n=200, temperature=1.0, seed=1)
  b, _ = _draws(n=200, temperature=1.0, seed=1)
  c, _ = _draws(n=200, temperature=1.0, seed=2)
  np.testing.assert_array_equal(a, b)
  assert np.mean(a != c) > 0.3


@pytest.mark.parametrize('field,value', [
    ('max_new_tokens', 0), ('temperature', -1.0), ('top_k', -2), ('top_p', 0.0),
    ('top_p', 1.5), ('seed', -1), ('stop', ('',))])
def test_bad_sampling_settings_name_the_field(field, value):
  with pytest.raises(ValueError, match=f'sampling.{field} must be'):
    SamplingParams(**{field: value})

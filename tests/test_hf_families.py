"""Today's Hugging Face checkpoints against `transformers` itself: Llama 3.x RoPE scaling and
Qwen3 (per-head q/k RMSNorm, explicit head_dim), tied and untied, LM and classifier.

As in test_hf.py: a tiny random HF model is saved, imported, and must give transformers'
outputs on a right-padded batch of mixed lengths (padding positions excluded); our export must
load back into the same transformers class with the same outputs. The Llama 3 frequency
scaling is also checked directly against transformers' `_compute_llama3_parameters` at the
real Llama-3.2-1B settings (our `llama_1b` preset).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tolerances
from llmopt_jax import hf
from llmopt_jax.hf import configs
from llmopt_jax.models import TransformerConfig, get_preset, layers, stats

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
rope_utils = pytest.importorskip('transformers.modeling_rope_utils')

V = 96
LENGTHS = (20, 13, 6)  # right padding: row i holds LENGTHS[i] real tokens
T = max(LENGTHS)
# Head dim 16 on a width of 32 (not 32 // 4): Qwen3 states head_dim, and both must honour it.
_SHAPE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16)
# Llama 3 scaling sized to this model: with rope_theta 500 the 8 frequencies have wavelengths
# 6.3, 13, 28, 59, ... tokens, so one is kept (< 16 / 2 = 8), two are blended (8..32) and the
# rest are slowed 4x; the batch's 20 tokens run past the "pretraining" context of 16.
_LLAMA3_ROPE = dict(rope_type='llama3', rope_theta=500.0, factor=4.0, low_freq_factor=0.5,
                    high_freq_factor=2.0, original_max_position_embeddings=16)
_QWEN3 = dict(_SHAPE, rope_parameters=dict(rope_type='default', rope_theta=500.0),
              rms_norm_eps=1e-5)

# name -> (HF class, its config class and fields, what the output is)
CASES = {
    'llama3_rope': ('LlamaForCausalLM', 'LlamaConfig',
                    dict(_SHAPE, rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=False),
                    'logits'),
    'qwen3_tied': ('Qwen3ForCausalLM', 'Qwen3Config', dict(_QWEN3, tie_word_embeddings=True),
                   'logits'),
    'qwen3_untied': ('Qwen3ForCausalLM', 'Qwen3Config',
                     dict(_QWEN3, tie_word_embeddings=False), 'logits'),
    'qwen3_classifier': ('Qwen3ForSequenceClassification', 'Qwen3Config',
                         dict(_QWEN3, num_labels=4, pad_token_id=0), 'classes'),
}


def _hf_model(name: str):
  cls, config_cls, fields, _ = CASES[name]
  torch.manual_seed(0)
  model = getattr(transformers, cls)(getattr(transformers, config_cls)(**fields)).eval()
  with torch.no_grad():  # HF initialises norm gains to 1: perturb every tensor
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def _batch() -> tuple[np.ndarray, np.ndarray]:
  """Tokens [B, T] (pad id 0) and their padding mask."""
  mask = (np.arange(T)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
  return np.random.default_rng(0).integers(1, V, mask.shape).astype(np.int32) * mask, mask


def _theirs(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()


def _rel_err(ours, theirs: np.ndarray, mask: np.ndarray | None) -> float:
  ours = np.asarray(ours)
  if mask is not None:  # token outputs: only real (non-padding) positions count
    ours, theirs = ours[mask > 0], theirs[mask > 0]
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _tol(config: TransformerConfig) -> float:
  """Two float32 forward passes' drift (tests/tolerances.py), plus the classifier's pooling
  over T and, with q/k norms, their two head_dim-term means per block."""
  qk_norms = 2 * config.num_layers * config.head_dim if config.qk_norm else 0
  return tolerances.sum_tolerance(tolerances.forward_terms(config, T) + T + qk_norms, 1.0)


@pytest.mark.parametrize('name', sorted(CASES))
def test_import_matches_transformers_and_export_round_trips(name, tmp_path):
  reference = _hf_model(name)
  reference.save_pretrained(tmp_path / 'hf', safe_serialization=True)
  model, config = hf.load_pretrained(str(tmp_path / 'hf'))
  tokens, mask = _batch()
  token_mask = None if CASES[name][3] == 'classes' else mask
  theirs = _theirs(reference, tokens, mask)
  ours = model(jnp.asarray(tokens), padding_mask=jnp.asarray(mask))
  assert _rel_err(ours, theirs, token_mask) < _tol(config)
  # The same parameters (HF counts a tied matrix once), the q/k norm gains included.
  assert sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))) == sum(
      p.numel() for p in reference.parameters())
  backbone = model.backbone if CASES[name][3] == 'classes' else model
  assert stats.count_params(config) == sum(
      p.size for p in jax.tree.leaves(nnx.state(backbone, nnx.Param)))
  # Split at a jit boundary as training does: the config's new fields are static and hashable.
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, padding_mask=m))
  assert _rel_err(jitted(state, jnp.asarray(tokens), jnp.asarray(mask)), theirs,
                  token_mask) < _tol(config)

  hf.export(model, config, str(tmp_path / 'ours'), pad_token_id=0)
  written = json.loads((tmp_path / 'ours' / 'config.json').read_text())
  assert written['model_type'] == reference.config.model_type
  assert written['rope_parameters']['rope_type'] == reference.config.rope_parameters['rope_type']
  exported = getattr(transformers, CASES[name][0]).from_pretrained(tmp_path / 'ours').eval()
  assert exported.config.rope_parameters == reference.config.rope_parameters
  assert _rel_err(_theirs(exported, tokens, mask), theirs, token_mask) < _tol(config)


def test_llama3_scaling_changes_the_model_and_covers_all_three_bands(tmp_path):
  _hf_model('llama3_rope').save_pretrained(tmp_path, safe_serialization=True)
  _, config = hf.load_pretrained(str(tmp_path))
  assert (config.rope_scaling_factor, config.rope_original_max_positions) == (4.0, 16)
  half = config.head_dim // 2
  inv_freq = config.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  scaling = layers.RopeScaling(config.rope_scaling_factor, config.rope_low_freq_factor,
                               config.rope_high_freq_factor, config.rope_original_max_positions)
  ratio = np.asarray(scaling(inv_freq) / inv_freq)
  kept, slowed = ratio == 1.0, ratio == 1.0 / config.rope_scaling_factor
  assert kept.sum() >= 1 and slowed.sum() >= 1 and (~kept & ~slowed).sum() >= 1, ratio

  tokens, mask = _batch()
  theirs = _theirs(_hf_model('llama3_rope'), tokens, mask)
  plain, _ = hf.load_pretrained(str(tmp_path), rope_scaling_factor=0.0)
  unscaled = plain(jnp.asarray(tokens), padding_mask=jnp.asarray(mask))
  # Far outside the rounding tolerance the scaled model meets: the test above would notice.
  assert _rel_err(unscaled, theirs, mask) > 100 * _tol(config)


# Llama-3.2-1B's config.json as published (its legacy `rope_scaling` key included).
_LLAMA_3_2_1B = dict(
    architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=128256, hidden_size=2048,
    intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
    max_position_embeddings=131072, hidden_act='silu', attention_bias=False, mlp_bias=False,
    rope_scaling=dict(rope_type='llama3', factor=32.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=8192))


def test_llama_1b_preset_is_llama_3_2_1b_with_transformers_frequencies():
  c = get_preset('llama_1b')
  assert hf.config_from_hf(_LLAMA_3_2_1B) == c
  reference = transformers.LlamaConfig(**_LLAMA_3_2_1B)
  theirs, _ = rope_utils.ROPE_INIT_FUNCTIONS['llama3'](reference, 'cpu')
  half = c.head_dim // 2
  inv_freq = c.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  ours = layers.RopeScaling(c.rope_scaling_factor, c.rope_low_freq_factor,
                            c.rope_high_freq_factor, c.rope_original_max_positions)(inv_freq)
  # Each side: a float32 power (the two libraries' may differ by an ulp or two), a division
  # and the blend's three operations.
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=tolerances.sum_tolerance(8, 1.0))


_LLAMA = {'model_type': 'llama', 'architectures': ['LlamaForCausalLM'], **_SHAPE}
_QWEN3_CONFIG = {'model_type': 'qwen3', 'architectures': ['Qwen3ForCausalLM'], **_SHAPE}


@pytest.mark.parametrize('config, message', [
    (dict(_LLAMA, rope_parameters={'rope_type': 'yarn', 'factor': 4.0}),
     r"rope_parameters\.rope_type='yarn'"),
    (dict(_LLAMA, rope_scaling={'type': 'dynamic', 'factor': 2.0}),
     r"rope_scaling\.rope_type='dynamic'"),
    (dict(_LLAMA, rope_parameters={k: v for k, v in _LLAMA3_ROPE.items() if k != 'factor'}),
     r"rope_parameters\.factor=None: a number is required by rope_type 'llama3'"),
    (dict(_LLAMA, rope_parameters=dict(_LLAMA3_ROPE, high_freq_factor=0.5)),
     r'rope_high_freq_factor \(0\.5\) must be > rope_low_freq_factor'),
    (dict(_QWEN3_CONFIG, use_sliding_window=True, sliding_window=8), r'use_sliding_window=True'),
    (dict(_QWEN3_CONFIG, attention_bias=True), r'attention_bias=True'),
], ids=['unknown_type', 'legacy_key', 'missing_factor', 'bad_factors', 'qwen3_window',
        'qwen3_o_bias'])
def test_unsupported_configs_fail_in_one_line_naming_the_key(config, message):
  with pytest.raises(ValueError, match=message) as error:
    hf.config_from_hf(config)
  assert '\n' not in str(error.value)


def test_new_fields_are_validated_and_exported_only_where_hf_has_a_class():
  with pytest.raises(ValueError, match='TransformerConfig.qk_norm is for family llama'):
    TransformerConfig(family='gpt2', max_positions=16, qk_norm=True)
  with pytest.raises(ValueError, match='TransformerConfig.rope_scaling_factor is for RoPE'):
    TransformerConfig(family='gpt2', max_positions=16, rope_scaling_factor=8.0)
  with pytest.raises(ValueError, match='TransformerConfig.rope_scaling_factor must be >= 0'):
    TransformerConfig(rope_scaling_factor=-1.0)
  with pytest.raises(ValueError, match='TransformerConfig.rope_original_max_positions'):
    TransformerConfig(rope_original_max_positions=0)
  with pytest.raises(ValueError, match="attention_bias: HF Qwen3's also puts a bias on o_proj"):
    configs.to_hf(TransformerConfig(qk_norm=True, attention_bias=True), None)

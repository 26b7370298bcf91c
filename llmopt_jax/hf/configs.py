"""Hugging Face `config.json` <-> `TransformerConfig` (+ classification head), per family.

HF names the architecture in `architectures` (the task class) and `model_type`; the sizes use
per-family keys (`hidden_size` / `n_embd`, ...). Settings we do not model (RoPE scaling other
than Llama 3's, Qwen2/3's per-layer sliding windows, an o_proj bias, relative positions) fail
here with the key named, rather than loading into a model that silently computes something else.
Qwen3 is a llama with per-head q/k norms (`qk_norm`); Llama 3.1+ adds RoPE frequency scaling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llmopt_jax.models.config import TransformerConfig
from llmopt_jax.models.heads import HeadConfig

# HF class -> (our family, what it is). 'base' has no head, 'lm' an LM head, 'classifier' a
# sequence-classification head.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    **{f'{m}{task}': ('llama', kind) for m in ('Llama', 'Mistral', 'Qwen2', 'Qwen3')
       for task, kind in (('Model', 'base'), ('ForCausalLM', 'lm'),
                          ('ForSequenceClassification', 'classifier'))},
    'GPT2Model': ('gpt2', 'base'), 'GPT2LMHeadModel': ('gpt2', 'lm'),
    'GPT2ForSequenceClassification': ('gpt2', 'classifier'),
    # BERT's pretraining heads (`cls.*`) are dropped: the encoder is what transfers.
    'BertModel': ('bert', 'base'), 'BertForMaskedLM': ('bert', 'base'),
    'BertForPreTraining': ('bert', 'base'),
    'BertForSequenceClassification': ('bert', 'classifier'),
}
MODEL_TYPES = {'llama': 'llama', 'mistral': 'llama', 'qwen2': 'llama', 'qwen3': 'llama',
               'gpt2': 'gpt2', 'bert': 'bert'}
# The pooling each HF classifier class uses.
HF_POOLING = {'llama': 'last', 'gpt2': 'last', 'bert': 'cls'}


def _fail(key: str, value: Any, why: str) -> None:
  raise ValueError(f'Hugging Face config {key}={value!r}: {why}')


def architecture(hf: Mapping[str, Any]) -> tuple[str, str]:
  """(family, 'base' | 'lm' | 'classifier') of an HF config."""
  names = hf.get('architectures') or []
  for name in names:
    if name in ARCHITECTURES:
      return ARCHITECTURES[name]
  if names:
    _fail('architectures', names, f'supported: {sorted(ARCHITECTURES)}')
  if hf.get('model_type') not in MODEL_TYPES:
    _fail('model_type', hf.get('model_type'), f'supported: {sorted(MODEL_TYPES)}')
  return MODEL_TYPES[hf['model_type']], 'base'


def _expect(hf: Mapping[str, Any], key: str, allowed: tuple, default: Any) -> None:
  if hf.get(key, default) not in allowed:
    _fail(key, hf.get(key), f'only {allowed} is supported')


_LLAMA3_KEYS = {'factor': 'rope_scaling_factor', 'low_freq_factor': 'rope_low_freq_factor',
                'high_freq_factor': 'rope_high_freq_factor',
                'original_max_position_embeddings': 'rope_original_max_positions'}


def _rope(hf: Mapping[str, Any]) -> dict[str, Any]:
  """Our RoPE fields, found where transformers 5 looks: the legacy `rope_scaling` before
  `rope_parameters`, `rope_theta` in that dict before the top-level key."""
  key = 'rope_scaling' if hf.get('rope_scaling') else 'rope_parameters'
  rope = hf.get(key) or {}
  if any(isinstance(value, Mapping) for value in rope.values()):
    _fail(key, rope, 'RoPE parameters per layer type are not supported')
  partial = rope.get('partial_rotary_factor', hf.get('partial_rotary_factor'))
  if partial not in (None, 1, 1.0):
    _fail('partial_rotary_factor', partial, 'only (None, 1.0) is supported')
  fields = {'rope_theta': float(rope.get('rope_theta', hf.get('rope_theta', 10000.0)))}
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type == 'default':
    return fields
  if rope_type != 'llama3':
    _fail(f'{key}.rope_type', rope_type, "supported: 'default', 'llama3'")
  # A top-level original_max_position_embeddings (Phi-3's place) wins over the dict's, and
  # max_position_embeddings stands in for a missing one, as in `standardize_rope_params`.
  rope = {'original_max_position_embeddings': hf.get('max_position_embeddings'), **rope}
  if hf.get('original_max_position_embeddings') is not None:
    rope['original_max_position_embeddings'] = hf['original_max_position_embeddings']
  for name, ours in _LLAMA3_KEYS.items():
    value = rope.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      _fail(f'{key}.{name}', value, "a number is required by rope_type 'llama3'")
    fields[ours] = value if ours == 'rope_original_max_positions' else float(value)
  return fields


def _llama(hf: Mapping[str, Any]) -> dict[str, Any]:
  """Llama 2/3, Mistral, Qwen2 (q/k/v biases) and Qwen3 (q/k norms, explicit head_dim)."""
  heads = hf['num_attention_heads']
  _expect(hf, 'hidden_act', ('silu',), 'silu')
  _expect(hf, 'mlp_bias', (False,), False)
  model_type = hf.get('model_type')
  if model_type in ('qwen2', 'qwen3'):
    _expect(hf, 'use_sliding_window', (False,), False)
  if model_type != 'qwen2':  # Llama's and Qwen3's attention_bias put a bias on o_proj too
    _expect(hf, 'attention_bias', (False,), False)
  window = hf.get('sliding_window') if model_type == 'mistral' else None
  # Qwen3Config's head_dim defaults to 128, the others' to hidden_size // heads.
  head_dim = hf.get('head_dim') or (128 if model_type == 'qwen3' else hf['hidden_size'] // heads)
  return dict(
      family='llama', embed_dim=hf['hidden_size'], num_layers=hf['num_hidden_layers'],
      num_heads=heads, num_kv_heads=hf.get('num_key_value_heads') or heads, head_dim=head_dim,
      mlp_dim=hf['intermediate_size'], norm_eps=hf.get('rms_norm_eps', 1e-6), **_rope(hf),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      attention_bias=model_type == 'qwen2', qk_norm=model_type == 'qwen3',
      sliding_window=window or 0, attention_dropout_rate=hf.get('attention_dropout', 0.0))


def _gpt2(hf: Mapping[str, Any]) -> dict[str, Any]:
  _expect(hf, 'activation_function', ('gelu_new', 'gelu_pytorch_tanh'), 'gelu_new')
  _expect(hf, 'scale_attn_weights', (True,), True)
  _expect(hf, 'scale_attn_by_inverse_layer_idx', (False,), False)
  _expect(hf, 'add_cross_attention', (False,), False)
  d, heads = hf['n_embd'], hf['n_head']
  return dict(
      family='gpt2', embed_dim=d, num_layers=hf['n_layer'], num_heads=heads,
      num_kv_heads=heads, head_dim=d // heads, mlp_dim=hf.get('n_inner') or 4 * d,
      max_positions=hf.get('n_positions', 1024), norm_eps=hf.get('layer_norm_epsilon', 1e-5),
      tie_embeddings=bool(hf.get('tie_word_embeddings', True)),
      dropout_rate=hf.get('resid_pdrop', 0.1), attention_dropout_rate=hf.get('attn_pdrop', 0.1))


def _bert(hf: Mapping[str, Any]) -> dict[str, Any]:
  _expect(hf, 'hidden_act', ('gelu',), 'gelu')
  _expect(hf, 'position_embedding_type', ('absolute',), 'absolute')
  _expect(hf, 'is_decoder', (False,), False)
  d, heads = hf['hidden_size'], hf['num_attention_heads']
  return dict(
      family='bert', embed_dim=d, num_layers=hf['num_hidden_layers'], num_heads=heads,
      num_kv_heads=heads, head_dim=d // heads, mlp_dim=hf['intermediate_size'],
      max_positions=hf.get('max_position_embeddings', 512),
      type_vocab_size=hf.get('type_vocab_size', 2), norm_eps=hf.get('layer_norm_eps', 1e-12),
      lm_head=False, dropout_rate=hf.get('hidden_dropout_prob', 0.1),
      attention_dropout_rate=hf.get('attention_probs_dropout_prob', 0.1))


def from_hf(hf: Mapping[str, Any]) -> tuple[TransformerConfig, HeadConfig | None]:
  """Our config of an HF `config.json` dict, and the head of a *ForSequenceClassification."""
  family, kind = architecture(hf)
  fields = {'llama': _llama, 'gpt2': _gpt2, 'bert': _bert}[family](hf)
  config = TransformerConfig(vocab_size=hf['vocab_size'], **fields)
  if kind != 'lm':
    config = config.replace(lm_head=False)
  if kind != 'classifier':
    return config, None
  labels = hf.get('id2label') or {}
  return config, HeadConfig(len(labels) or hf.get('num_labels', 2), HF_POOLING[family])


def config_from_hf(hf: Mapping[str, Any]) -> TransformerConfig:
  """Our `TransformerConfig` of an HF `config.json` dict (any supported class)."""
  return from_hf(hf)[0]


# Our family (and, for llama, its variant) -> HF model_type and class-name stem.
_HF_NAMES = {'llama': 'Llama', 'mistral': 'Mistral', 'qwen2': 'Qwen2', 'qwen3': 'Qwen3',
             'gpt2': 'GPT2', 'bert': 'Bert'}


def _export_error(field: str, why: str) -> None:
  raise ValueError(f'cannot export to Hugging Face: {field}: {why}')


def _rope_to_hf(c: TransformerConfig) -> dict[str, Any]:
  if not c.rope_scaling_factor:
    return {'rope_type': 'default', 'rope_theta': c.rope_theta}
  return {'rope_type': 'llama3', 'rope_theta': c.rope_theta,
          **{name: getattr(c, ours) for name, ours in _LLAMA3_KEYS.items()}}


def _llama_to_hf(c: TransformerConfig) -> tuple[str, dict[str, Any]]:
  model_type = ('qwen3' if c.qk_norm else 'qwen2' if c.attention_bias else
                'mistral' if c.sliding_window else 'llama')
  fields = dict(
      hidden_size=c.embed_dim, intermediate_size=c.mlp_dim, num_hidden_layers=c.num_layers,
      num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
      head_dim=c.head_dim, rms_norm_eps=c.norm_eps, hidden_act='silu',
      rope_parameters=_rope_to_hf(c), rope_theta=c.rope_theta,
      attention_dropout=c.attention_dropout_rate)
  if model_type == 'qwen3':
    if c.attention_bias:
      _export_error('TransformerConfig.attention_bias', "HF Qwen3's also puts a bias on o_proj")
    if c.sliding_window:
      _export_error('TransformerConfig.sliding_window',
                    'HF Qwen3 slides only the layers past max_window_layers')
    fields.update(attention_bias=False, use_sliding_window=False)
  elif model_type == 'qwen2':
    if c.sliding_window:
      _export_error('TransformerConfig.sliding_window', 'Qwen2 (attention_bias) has none')
    if c.head_dim * c.num_heads != c.embed_dim:
      _export_error('TransformerConfig.head_dim', 'Qwen2 needs head_dim * num_heads == embed_dim')
    del fields['head_dim']
    fields.update(use_sliding_window=False)
  elif model_type == 'mistral':
    fields.update(sliding_window=c.sliding_window)
  else:
    fields.update(attention_bias=False, mlp_bias=False)
  return model_type, fields


def _mha_only(c: TransformerConfig) -> None:
  if c.num_kv_heads != c.num_heads or c.head_dim * c.num_heads != c.embed_dim:
    _export_error('TransformerConfig.num_kv_heads/head_dim',
                  f'HF {c.family} needs num_kv_heads == num_heads and '
                  f'head_dim * num_heads == embed_dim')


def _gpt2_to_hf(c: TransformerConfig) -> tuple[str, dict[str, Any]]:
  _mha_only(c)
  return 'gpt2', dict(
      n_embd=c.embed_dim, n_layer=c.num_layers, n_head=c.num_heads, n_inner=c.mlp_dim,
      n_positions=c.max_positions, layer_norm_epsilon=c.norm_eps,
      activation_function='gelu_new', resid_pdrop=c.dropout_rate, embd_pdrop=c.dropout_rate,
      attn_pdrop=c.attention_dropout_rate)


def _bert_to_hf(c: TransformerConfig) -> tuple[str, dict[str, Any]]:
  _mha_only(c)
  if not c.type_vocab_size:
    _export_error('TransformerConfig.type_vocab_size', 'HF BERT always has token types')
  return 'bert', dict(
      hidden_size=c.embed_dim, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
      intermediate_size=c.mlp_dim, hidden_act='gelu', max_position_embeddings=c.max_positions,
      type_vocab_size=c.type_vocab_size, layer_norm_eps=c.norm_eps,
      hidden_dropout_prob=c.dropout_rate, attention_probs_dropout_prob=c.attention_dropout_rate,
      position_embedding_type='absolute')


def to_hf(config: TransformerConfig, head: HeadConfig | None, *,
          pad_token_id: int | None = None,
          labels: Sequence[str] | None = None) -> dict[str, Any]:
  """The HF `config.json` dict of our model; fails when transformers has no matching class."""
  c = config
  model_type, fields = {'llama': _llama_to_hf, 'gpt2': _gpt2_to_hf, 'bert': _bert_to_hf}[
      c.family](c)
  stem = _HF_NAMES[model_type]
  if head is not None:
    if head.pooling != HF_POOLING[c.family]:
      _export_error('pooling', f'HF {stem}ForSequenceClassification pools '
                    f'{HF_POOLING[c.family]!r}, this head pools {head.pooling!r}; export the '
                    f'backbone instead')
    if HF_POOLING[c.family] == 'last' and pad_token_id is None:
      _export_error('pad_token_id', f'{stem}ForSequenceClassification finds the last token '
                    f'through it; pass pad_token_id or tokenizer_dir')
    if labels is not None and len(labels) != head.num_labels:
      _export_error('labels', f'{len(labels)} names for {head.num_labels} labels')
    names = list(labels) if labels is not None else [f'LABEL_{i}' for i in range(head.num_labels)]
    fields.update(id2label={str(i): n for i, n in enumerate(names)},
                  label2id={n: i for i, n in enumerate(names)})
    architecture = f'{stem}ForSequenceClassification'
  elif c.lm_head:
    if c.family == 'bert':
      _export_error('TransformerConfig.lm_head', 'HF BERT has no plain LM head; set it False')
    architecture = f'{stem}LMHeadModel' if c.family == 'gpt2' else f'{stem}ForCausalLM'
  else:
    architecture = f'{stem}Model'
  return dict(architectures=[architecture], model_type=model_type, vocab_size=c.vocab_size,
              tie_word_embeddings=c.tie_embeddings, dtype=c.param_dtype,
              pad_token_id=pad_token_id, **fields)

"""The shape and numerics of a transformer (Llama, GPT-2 or BERT family), and named presets.

A config is a frozen dataclass so it can be hashed, compared and passed to `jax.jit` as a
static argument, and so an experiment config (ml_collections) can build one from a plain dict
with `TransformerConfig.from_dict(cfg.model.to_dict())`. Changing one field of a preset is
`dataclasses.replace(get_preset('small'), vocab_size=65)`.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

from llmopt_jax.models import families

# Activation and storage dtypes we support; int types belong to the quantization stage.
DTYPES = ('float32', 'bfloat16', 'float16')

_POSITIVE_INTS = (
    'vocab_size', 'num_layers', 'embed_dim', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim',
    'rope_original_max_positions')
_NON_NEGATIVE_INTS = ('max_positions', 'type_vocab_size', 'sliding_window')


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters of `Transformer`; the defaults are the `tiny` preset (a llama)."""

  vocab_size: int = 256  # Overridden by the training stage from its tokenizer.
  num_layers: int = 2
  embed_dim: int = 64  # D, the width of the residual stream.
  num_heads: int = 4  # N, query heads.
  num_kv_heads: int = 2  # K, key/value heads: 1 is MQA, num_heads is MHA, between is GQA.
  head_dim: int = 16  # H; need not equal embed_dim // num_heads (Gemma-style freedom).
  mlp_dim: int = 192  # F, MLP hidden width: SwiGLU ~8/3 D has the params of a 4D GELU MLP.
  rope_theta: float = 10000.0  # RoPE base; Llama 3 raises it to 500k for long contexts.
  # Llama 3.1+ RoPE frequency scaling (HF rope_type 'llama3', see layers.RopeScaling): low
  # frequencies are divided by `rope_scaling_factor`, high ones kept, those between blended.
  # 0 turns it off; the other three fields then do nothing (their defaults are the values of
  # every Llama 3.x checkpoint).
  rope_scaling_factor: float = 0.0
  rope_low_freq_factor: float = 1.0  # Wavelengths above original / this are scaled fully.
  rope_high_freq_factor: float = 4.0  # Wavelengths below original / this are not scaled.
  rope_original_max_positions: int = 8192  # The context length of pretraining.
  norm_eps: float = 1e-5
  tie_embeddings: bool = True  # Logits through the embedding table (saves V*D params).
  dropout_rate: float = 0.0  # On each residual branch; pretraining at scale uses 0.
  attention_dropout_rate: float = 0.0  # On the attention probabilities.
  dtype: str = 'float32'  # Compute dtype of matmuls and activations ('bfloat16' on TPU/GPU).
  param_dtype: str = 'float32'  # Storage dtype of the parameters.
  init_std: float = 0.02  # Std of the normal init of every matrix (GPT-2).
  # Block structure: 'llama', 'gpt2' or 'bert' (see families.py for what each one fixes).
  family: str = 'llama'
  attention_bias: bool = False  # q/k/v biases on a llama-family model (Qwen2).
  # RMSNorm over each head's features of q and k, before RoPE, on a llama-family model
  # (Qwen3): it bounds the attention logits, which otherwise grow and spike in training.
  qk_norm: bool = False
  max_positions: int = 0  # Size of the learned position table (gpt2, bert); RoPE needs none.
  type_vocab_size: int = 0  # BERT's token-type (segment A/B) embeddings; 0: none.
  sliding_window: int = 0  # Mistral v0.1: a query sees the last this-many keys; 0: all.
  lm_head: bool = True  # False: no output layer, a backbone for a head (classification).

  def __post_init__(self):
    for name in _POSITIVE_INTS:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f'TransformerConfig.{name} must be a positive int, got {value!r}')
    for name in _NON_NEGATIVE_INTS:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f'TransformerConfig.{name} must be an int >= 0, got {value!r}')
    family = families.get(self.family)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'TransformerConfig.num_heads ({self.num_heads}) must be divisible by '
          f'num_kv_heads ({self.num_kv_heads}) for grouped-query attention')
    if family.positions == 'rope' and self.head_dim % 2:
      raise ValueError(
          f'TransformerConfig.head_dim must be even for rotary embeddings, got {self.head_dim}')
    if (family.positions == 'learned') != (self.max_positions > 0):
      raise ValueError(
          f'TransformerConfig.max_positions must be > 0 for learned positions (gpt2, bert) and '
          f'0 for RoPE (llama); family {self.family!r} got {self.max_positions}')
    if self.type_vocab_size and self.family != 'bert':
      raise ValueError(f'TransformerConfig.type_vocab_size is for family bert, got '
                       f'{self.type_vocab_size} with family {self.family!r}')
    if self.attention_bias and self.family != 'llama':
      raise ValueError(f'TransformerConfig.attention_bias is for family llama; {self.family} '
                       f'always has attention biases')
    if self.qk_norm and self.family != 'llama':
      raise ValueError(f'TransformerConfig.qk_norm is for family llama, got family '
                       f'{self.family!r}')
    self._check_rope_scaling(family)
    if self.sliding_window and not family.causal:
      raise ValueError(f'TransformerConfig.sliding_window is for causal families, got '
                       f'{self.sliding_window} with family {self.family!r}')
    for name in ('rope_theta', 'norm_eps', 'init_std'):
      if not getattr(self, name) > 0:
        raise ValueError(f'TransformerConfig.{name} must be > 0, got {getattr(self, name)!r}')
    for name in ('dropout_rate', 'attention_dropout_rate'):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(
            f'TransformerConfig.{name} must be in [0, 1), got {getattr(self, name)!r}')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in DTYPES:
        raise ValueError(
            f'TransformerConfig.{name} must be one of {DTYPES}, got {getattr(self, name)!r}')

  def _check_rope_scaling(self, family: families.Family) -> None:
    if not self.rope_scaling_factor >= 0:
      raise ValueError(f'TransformerConfig.rope_scaling_factor must be >= 0 (0: off), got '
                       f'{self.rope_scaling_factor!r}')
    if self.rope_scaling_factor and family.positions != 'rope':
      raise ValueError(f'TransformerConfig.rope_scaling_factor is for RoPE (family llama), got '
                       f'family {self.family!r}')
    if not self.rope_low_freq_factor > 0:
      raise ValueError(f'TransformerConfig.rope_low_freq_factor must be > 0, got '
                       f'{self.rope_low_freq_factor!r}')
    if not self.rope_high_freq_factor > self.rope_low_freq_factor:
      raise ValueError(
          f'TransformerConfig.rope_high_freq_factor ({self.rope_high_freq_factor!r}) must be > '
          f'rope_low_freq_factor ({self.rope_low_freq_factor!r})')

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> TransformerConfig:
    """Builds a config from a plain dict, naming any key that is not a field."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(
          f'unknown TransformerConfig field(s) {unknown}; known fields: {sorted(fields)}')
    return cls(**d)

  def replace(self, **changes: Any) -> TransformerConfig:
    """A copy with some fields changed; unknown names raise ValueError like `from_dict`."""
    return self.from_dict({**dataclasses.asdict(self), **changes})


PRESETS: dict[str, TransformerConfig] = {
    # Seconds on a laptop CPU; what tests and every config's `tiny` variant use.
    'tiny': TransformerConfig(
        vocab_size=256, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2,
        head_dim=16, mlp_dim=192),
    # Learns tiny Shakespeare (character level) in a few CPU minutes.
    'small': TransformerConfig(
        vocab_size=256, num_layers=4, embed_dim=256, num_heads=8, num_kv_heads=4,
        head_dim=32, mlp_dim=768),
    # GPT-2 small widths with Llama components; the SwiGLU MLP at 4x width makes it 113M
    # non-embedding params (GPT-2's 4x GELU MLP: 85M).
    'base': TransformerConfig(
        vocab_size=32000, num_layers=12, embed_dim=768, num_heads=12, num_kv_heads=12,
        head_dim=64, mlp_dim=3072),
    # Llama-3.2-1B, for memory and FLOP planning and for weight import, with its 'llama3'
    # RoPE frequency scaling (factor 32 over a pretraining context of 8192) for 128k contexts.
    'llama_1b': TransformerConfig(
        vocab_size=128256, num_layers=16, embed_dim=2048, num_heads=32, num_kv_heads=8,
        head_dim=64, mlp_dim=8192, rope_theta=500000.0, tie_embeddings=True,
        rope_scaling_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
        rope_original_max_positions=8192),
    # Shapes of Llama-2-7B (MHA, untied output layer).
    'llama_7b': TransformerConfig(
        vocab_size=32000, num_layers=32, embed_dim=4096, num_heads=32, num_kv_heads=32,
        head_dim=128, mlp_dim=11008, rope_theta=10000.0, tie_embeddings=False),
}


def get_preset(name: str, **overrides: Any) -> TransformerConfig:
  """The preset called `name`, with any fields in `overrides` replaced."""
  if name not in PRESETS:
    raise ValueError(f'unknown model preset {name!r}; choose from {sorted(PRESETS)}')
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]

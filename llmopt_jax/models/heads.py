"""Sequence classification on top of any `Transformer` family: pool, then a linear classifier.

The layouts follow the Hugging Face classes so that checkpoints move both ways:
  - BertForSequenceClassification: `cls` pooling through BERT's pooler (dense + tanh on the
    first token), dropout, then `classifier` with a bias.
  - LlamaForSequenceClassification / GPT2ForSequenceClassification: `last` pooling (the last
    non-padding token, the only one that has seen the whole text in a decoder), then `score`,
    a matrix without a bias. Our classifier of a causal family therefore has no bias either.
`mean` pooling (sentence-transformers' choice for MiniLM) is available for every family.

Axis letters: B batch   T length   D embed   L labels
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from llmopt_jax.models import dropout
from llmopt_jax.models import families
from llmopt_jax.models import layers
from llmopt_jax.models.config import TransformerConfig
from llmopt_jax.models.transformer import Intermediates, Transformer

POOLINGS = ('cls', 'mean', 'last')


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """What a classification head needs besides the backbone's config."""

  num_labels: int
  pooling: str = 'cls'  # One of POOLINGS.

  def __post_init__(self):
    if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) or (
        self.num_labels < 1):
      raise ValueError(f'HeadConfig.num_labels must be a positive int, got {self.num_labels!r}')
    if self.pooling not in POOLINGS:
      raise ValueError(f'HeadConfig.pooling must be one of {POOLINGS}, got {self.pooling!r}')


def pool(hidden: jax.Array, padding_mask: jax.Array | None, how: str) -> jax.Array:
  """One vector [B,D] per sequence from hidden states [B,T,D]; means are taken in float32.

  'cls': the first token. 'mean': the average over real tokens (padding_mask 1).
  'last': the last real token (right padding), as HF's decoder classifiers pick it.
  """
  if how == 'cls':
    return hidden[:, 0]
  b, t, _ = hidden.shape
  mask = jnp.ones((b, t), jnp.float32) if padding_mask is None else padding_mask.astype(
      jnp.float32)
  if how == 'mean':
    total = jnp.einsum('BTD,BT->BD', hidden.astype(jnp.float32), mask)
    # sentence-transformers clamps the count the same way, so an all-padding row gives 0.
    return (total / jnp.maximum(mask.sum(axis=1, keepdims=True), 1e-9)).astype(hidden.dtype)
  if how == 'last':
    last = jnp.max(jnp.where(mask > 0, jnp.arange(t), 0), axis=1)  # [B]
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  raise ValueError(f'pooling must be one of {POOLINGS}, got {how!r}')


class SequenceClassifier(nnx.Module):
  """Tokens [B,T] -> class logits [B,L] float32: backbone, pooling, (pooler,) classifier.

  The backbone is built with `lm_head=False`: an untied output matrix would be V x D
  parameters that classification never uses (and that an optimizer would still carry).
  """

  def __init__(self, config: TransformerConfig, num_labels: int, *, pooling: str = 'cls',
               rngs: nnx.Rngs):
    head = HeadConfig(num_labels, pooling)
    family = families.get(config.family)
    c = config.replace(lm_head=False)
    self.config = c
    self.head = head
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    self.backbone = Transformer(c, rngs=rngs)
    dense = functools.partial(layers.Dense, c.embed_dim, axes=('embed', None),
                              init_std=c.init_std, dtype=dtype, param_dtype=pdtype, rngs=rngs)
    self.pooler = dense(c.embed_dim, use_bias=True) if uses_pooler(c, head) else None
    self.dropout = dropout.Dropout(c.dropout_rate)
    self.classifier = dense(num_labels, use_bias=not family.causal)

  def __call__(self, tokens: jax.Array, *, token_types: jax.Array | None = None,
               padding_mask: jax.Array | None = None, rngs: nnx.Rngs | None = None,
               intermediates: bool = False) -> jax.Array | tuple[jax.Array, Intermediates]:
    """Logits [B,L] float32; `padding_mask` [B,T] is 1 for real tokens (see `encode`).
    With `intermediates=True`, also the backbone's `Intermediates`."""
    out = self.backbone.encode(tokens, token_types=token_types, padding_mask=padding_mask,
                               rngs=rngs, intermediates=intermediates)
    hidden = out[0] if intermediates else out
    pooled = pool(hidden, padding_mask, self.head.pooling)  # [B, D]
    if self.pooler is not None:
      pooled = jnp.tanh(self.pooler(pooled))
    pooled = self.dropout(pooled, deterministic=rngs is None, rngs=rngs)
    logits = self.classifier(pooled).astype(jnp.float32)
    return (logits, out[1]) if intermediates else logits


def uses_pooler(config: TransformerConfig, head: HeadConfig) -> bool:
  """BERT's pooler belongs to `cls` pooling on a bert: it was pretrained on that token."""
  return config.family == 'bert' and head.pooling == 'cls'

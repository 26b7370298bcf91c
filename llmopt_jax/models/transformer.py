"""One transformer in Flax NNX for three families: Llama-style decoders, GPT-2 and BERT.

Every family is a stack of residual blocks of attention and an MLP; `families.py` says how
they differ. Pre-norm families (Llama, GPT-2) compute x + f(norm(x)) and normalise once more
after the last block; post-norm BERT computes norm(x + f(x)) and normalises the embeddings
instead. Llama rotates queries and keys (RoPE); GPT-2 and BERT add a learned position table
(and BERT a token-type table) to the token embeddings. Decoders end in logits through the tied
embedding table or a separate output matrix (Touvron et al. 2023; Radford et al. 2019); an
encoder, or a backbone for a classification head, has no output layer (`lm_head=False`).

Axis letters used in the einsums and shape comments:
  B batch   T length   D embed   V vocab

Usage:
  model = Transformer(get_preset('tiny'), rngs=nnx.Rngs(0))
  logits = model(tokens)                            # deterministic (evaluation)
  logits = model(tokens, rngs=nnx.Rngs(dropout=k))  # with dropout (training)
  hidden = model.encode(tokens, padding_mask=mask)  # [B,T,D], as HF's base models return it
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llmopt_jax import sharding
from llmopt_jax.models import attention
from llmopt_jax.models import dropout
from llmopt_jax.models import families
from llmopt_jax.models import kv_cache
from llmopt_jax.models import layers
from llmopt_jax.models.config import TransformerConfig

_RESIDUAL = ('batch', 'length', 'embed')


class Intermediates(NamedTuple):
  """What a forward pass saw on the way, for distillation and probing."""
  # L + 1 residual streams [B,T,D]: the embeddings' output, then each block's (before the
  # final norm of pre-norm families; BERT's are normalised already), like HF hidden_states.
  hidden_states: tuple[jax.Array, ...]
  # L attention weight maps [B,N,T,S], float32, before attention dropout.
  attentions: tuple[jax.Array, ...]


class Block(nnx.Module):
  """One layer: attention, then MLP, each a residual branch, normalised pre or post."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    family = families.get(c.family)
    self.post_norm = family.post_norm
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    norm = functools.partial(layers.make_norm, family.norm, c.embed_dim, eps=c.norm_eps,
                             dtype=dtype, param_dtype=pdtype, rngs=rngs)
    self.attn_norm = norm()
    self.attn = attention.Attention(c, rngs=rngs)
    self.mlp_norm = norm()
    # `down` is a residual output projection: scaled like attention's `o` (see Attention).
    self.mlp = layers.Mlp(
        c.embed_dim, c.mlp_dim, init_std=c.init_std,
        out_std=c.init_std / math.sqrt(2 * c.num_layers), dtype=dtype, param_dtype=pdtype,
        rngs=rngs, activation=family.activation, gated=family.gated_mlp, use_bias=family.bias)
    self.dropout = dropout.Dropout(c.dropout_rate)

  def __call__(self, x: jax.Array, *, positions: jax.Array, mask: jax.Array,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    """The residual stream [B,T,D] after this layer, and its attention weights [B,N,T,S];
    dropout only when `rngs` is given."""
    drop = functools.partial(self.dropout, deterministic=rngs is None, rngs=rngs)
    attend = functools.partial(self.attn, positions=positions, mask=mask, rngs=rngs)
    return self._residual(x, attend, drop)

  def decode(self, x: jax.Array, *, positions: jax.Array, mask: jax.Array, cursor: jax.Array,
             keys: jax.Array, values: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """This layer over new tokens with a KV cache (`Attention.cached`): the residual stream
    and the layer's updated (keys, values)."""
    attend = functools.partial(self.attn.cached, positions=positions, mask=mask, cursor=cursor,
                               keys=keys, values=values)
    x, (keys, values) = self._residual(x, lambda y: _split_first(attend(y)), lambda y: y)
    return x, (keys, values)

  def _residual(self, x: jax.Array, attend, drop) -> tuple[jax.Array, object]:
    """The block's two residual branches around `attend` (which returns the attention output
    and whatever else it reports) and the MLP, normalised pre or post."""
    if self.post_norm:
      attended, extra = attend(x)
      x = self.attn_norm(x + drop(attended))
      x = self.mlp_norm(x + drop(self.mlp(x)))
    else:
      attended, extra = attend(self.attn_norm(x))
      x = x + drop(attended)
      x = x + drop(self.mlp(self.mlp_norm(x)))
    return sharding.constrain(x, _RESIDUAL), extra


def _split_first(out: tuple) -> tuple:
  return out[0], out[1:]


class Transformer(nnx.Module):
  """Tokens [B,T] -> hidden states [B,T,D] (`encode`) -> logits [B,T,V] float32 (`__call__`).

  The forward pass is split into `embed`, the `blocks` and `unembed` so that techniques that
  need intermediate activations (hidden-state distillation, probing) can run the same pieces
  and read what they need between them.
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    family = families.get(c.family)
    self.config = c
    self.causal = family.causal
    self.dtype = jnp.dtype(c.dtype)
    pdtype = jnp.dtype(c.param_dtype)
    init = layers.normal(c.init_std)
    self.embedding = layers.param(
        rngs, init, (c.vocab_size, c.embed_dim), pdtype, ('vocab', 'embed'))
    table = functools.partial(layers.Embed, init_std=c.init_std, param_dtype=pdtype, rngs=rngs)
    self.position_embed = table(c.max_positions, c.embed_dim) if c.max_positions else None
    self.token_type_embed = table(c.type_vocab_size, c.embed_dim) if c.type_vocab_size else None
    norm = functools.partial(layers.make_norm, family.norm, c.embed_dim, eps=c.norm_eps,
                             dtype=self.dtype, param_dtype=pdtype, rngs=rngs)
    self.embed_norm = norm() if family.post_norm else None
    # GPT-2 and BERT drop out the summed embeddings; Llama has no dropout there.
    self.embed_dropout = dropout.Dropout(c.dropout_rate if family.positions == 'learned' else 0.0)
    self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_layers)])
    self.final_norm = None if family.post_norm else norm()
    # Named `lm_head`, not `*embedding`, so name-based rules (weight decay) treat it as the
    # ordinary matrix it is.
    self.lm_head = layers.param(
        rngs, init, (c.embed_dim, c.vocab_size), pdtype, ('embed', 'vocab')
    ) if c.lm_head and not c.tie_embeddings else None

  def embed(self, tokens: jax.Array, *, positions: jax.Array | None = None,
            token_types: jax.Array | None = None, rngs: nnx.Rngs | None = None) -> jax.Array:
    """The residual stream [B,T,D] at the input: token embeddings, plus the learned position
    and token-type embeddings of the families that have them (BERT then normalises)."""
    x = layers.lookup(self.embedding, tokens, self.dtype)
    if self.position_embed is not None:
      positions = jnp.arange(tokens.shape[1]) if positions is None else positions
      x = x + self.position_embed(jnp.broadcast_to(positions, tokens.shape)).astype(self.dtype)
    if self.token_type_embed is not None:
      # HF's default when no types are given: every token in segment A.
      types = jnp.zeros_like(tokens) if token_types is None else token_types
      x = x + self.token_type_embed(types).astype(self.dtype)
    elif token_types is not None:
      raise ValueError('token_types given, but TransformerConfig.type_vocab_size is 0')
    if self.embed_norm is not None:
      x = self.embed_norm(x)
    x = self.embed_dropout(x, deterministic=rngs is None, rngs=rngs)
    return sharding.constrain(x, _RESIDUAL)

  def encode(self, tokens: jax.Array, *, positions: jax.Array | None = None,
             segment_ids: jax.Array | None = None, token_types: jax.Array | None = None,
             padding_mask: jax.Array | None = None, rngs: nnx.Rngs | None = None,
             intermediates: bool = False) -> jax.Array | tuple[jax.Array, Intermediates]:
    """Final hidden states [B,T,D] for `tokens` [B,T], after the final norm where the family
    has one: what a Hugging Face base model (LlamaModel, GPT2Model, BertModel) returns.
    With `intermediates=True`, also every layer's residual stream and attention weights
    (`Intermediates`), for techniques that learn from them (distillation).

    Args:
      tokens: int token ids [B,T].
      positions: positions [B,T] (or [T]); default 0..T-1. Packed batches pass the position
        within each document. RoPE angles or rows of the learned position table.
      segment_ids: [B,T] ids; a token attends only to tokens with the same id.
      token_types: [B,T] BERT segment (sentence A/B) ids; default all 0.
      padding_mask: [B,T], 1 for real tokens and 0 for padding; padding keys are hidden from
        every query. Outputs at padding positions are meaningless.
      rngs: None for a deterministic pass (evaluation); otherwise dropout keys come from
        `rngs.dropout()`. The module stores no RNG state, so `nnx.split(model, nnx.Param)`
        holds everything.
    """
    b, t = tokens.shape
    c = self.config
    if positions is None and c.max_positions and t > c.max_positions:
      raise ValueError(f'sequence length {t} exceeds TransformerConfig.max_positions '
                       f'({c.max_positions}), the size of the learned position table')
    positions = jnp.broadcast_to(jnp.arange(t) if positions is None else positions, (b, t))
    mask = attention.attention_mask(
        t, segment_ids, causal=self.causal, padding_mask=padding_mask,
        sliding_window=c.sliding_window)
    x = self.embed(tokens, positions=positions, token_types=token_types, rngs=rngs)
    streams, attentions = [x], []
    for block in self.blocks:
      x, probs = block(x, positions=positions, mask=mask, rngs=rngs)
      streams.append(x)
      attentions.append(probs)
    if self.final_norm is not None:
      x = sharding.constrain(self.final_norm(x), _RESIDUAL)
    if intermediates:
      return x, Intermediates(tuple(streams), tuple(attentions))
    return x

  def decode(self, tokens: jax.Array, *, positions: jax.Array, token_mask: jax.Array,
             cache: kv_cache.KVCache) -> tuple[jax.Array, kv_cache.KVCache]:
    """Generation's forward pass: T new tokens per row [B,T] through the cache.

    Their keys and values go into `cache` at each row's cursor (`token_mask` [B,T] 0 marks
    left padding, never attended to); each token attends to its row's earlier valid slots.
    Prefill is a call with the (padded) prompt, each decode step one with T = 1. Returns the
    logits [B,V] float32 of the last new token of each row, the only ones sampling needs,
    and the updated cache. Decoders only.
    """
    if not self.causal:
      raise ValueError(f'decode needs a causal family; {self.config.family} is an encoder')
    c = self.config
    valid = kv_cache.write(cache.valid, token_mask.astype(jnp.bool_), cache.cursor)
    mask = kv_cache.visible(valid, cache.cursor, tokens.shape[1], c.sliding_window)
    x = self.embed(tokens, positions=positions)
    keys, values = [], []
    for block, k, v in zip(self.blocks, cache.keys, cache.values, strict=True):
      x, (k, v) = block.decode(x, positions=positions, mask=mask, cursor=cache.cursor,
                               keys=k, values=v)
      keys.append(k)
      values.append(v)
    logits = self.unembed(x[:, -1:])[:, 0]
    cursor = cache.cursor + tokens.shape[1]
    return logits, kv_cache.KVCache(tuple(keys), tuple(values), valid, cursor)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Logits [B,T,V] from final hidden states, accumulated and returned in float32."""
    if not self.config.lm_head:
      raise ValueError('this Transformer has no LM head (TransformerConfig.lm_head=False); '
                       'use encode() or a head from models.heads')
    x = hidden.astype(self.dtype)
    if self.lm_head is None:
      logits = layers.contract('BTD,VD->BTV', x, self.embedding, self.dtype,
                               preferred_element_type=jnp.float32)
    else:
      logits = layers.contract('BTD,DV->BTV', x, self.lm_head, self.dtype,
                               preferred_element_type=jnp.float32)
    return sharding.constrain(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))

  def unembed(self, x: jax.Array) -> jax.Array:
    """Logits [B,T,V] from the last residual stream: the final norm, then `logits`."""
    return self.logits(x if self.final_norm is None else self.final_norm(x))

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, token_types: jax.Array | None = None,
               padding_mask: jax.Array | None = None, rngs: nnx.Rngs | None = None,
               intermediates: bool = False) -> jax.Array | tuple[jax.Array, Intermediates]:
    """Logits [B,T,V] float32 for `tokens` [B,T]; the arguments are those of `encode`."""
    out = self.encode(
        tokens, positions=positions, segment_ids=segment_ids, token_types=token_types,
        padding_mask=padding_mask, rngs=rngs, intermediates=intermediates)
    if intermediates:
      hidden, inner = out
      return self.logits(hidden), inner
    return self.logits(out)

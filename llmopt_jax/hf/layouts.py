"""Which Hugging Face tensor holds which of our parameters, and how to convert between them.

One explicit table per family, in HF's names relative to the base model (`LlamaModel`,
`GPT2Model`, `BertModel`); heads add their own top-level names. Layouts:
  linear  torch.nn.Linear weight [out, in]: our kernel is its transpose, reshaped
          (q_proj [N*H, D] -> q [D, N, H]; o_proj [D, N*H] -> o [N, H, D]).
  conv1d  GPT-2's Conv1D weight, already [in, out]: reshaped only.
  vector  a bias or norm gain [n]: reshaped (q_proj.bias [N*H] -> q_bias [N, H]; Qwen3's
          q_norm.weight [H] -> q_norm scale [H]).
  table   an embedding table [rows, D]: as is.
An HF tensor may hold several of our parameters side by side along its output features
(GPT-2's fused c_attn is q, k and v): they are split on import and concatenated on export.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from llmopt_jax.models.config import TransformerConfig
from llmopt_jax.models.heads import HeadConfig

Path = tuple[str | int, ...]

# The attribute under which HF's task classes keep the base model, by family.
PREFIX = {'llama': 'model', 'gpt2': 'transformer', 'bert': 'bert'}


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One HF tensor and the parameters of ours it holds, in output-feature order."""

  hf: str
  ours: tuple[Path, ...]
  layout: str  # 'linear', 'conv1d', 'vector' or 'table'
  in_ndim: int = 1  # Leading axes of our kernel that are the matmul's input (o: [N, H] -> 2).
  # 'backbone' is always required; a head group ('lm_head', 'pooler', 'classifier') is loaded
  # when our model has it, and freshly initialised when a checkpoint has none of its tensors.
  group: str = 'backbone'
  in_base: bool = True  # The name lives under the base model's prefix (`bert.pooler...`).


def _vector(hf: str, *ours: Path, **kw) -> Tensor:
  return Tensor(hf, ours, 'vector', in_ndim=0, **kw)


def _norm(hf: str, ours: Path, kind: str, weight: str = 'weight') -> list[Tensor]:
  gain = [_vector(f'{hf}.{weight}', ours + ('scale',))]
  return gain + ([_vector(f'{hf}.bias', ours + ('bias',))] if kind == 'layer' else [])


def _llama_layer(c: TransformerConfig, hf: str, ours: Path) -> list[Tensor]:
  t = [*_norm(f'{hf}.input_layernorm', ours + ('attn_norm',), 'rms'),
       *_norm(f'{hf}.post_attention_layernorm', ours + ('mlp_norm',), 'rms')]
  for name in 'qkv':
    t.append(Tensor(f'{hf}.self_attn.{name}_proj.weight', (ours + ('attn', name),), 'linear'))
    if c.attention_bias:
      bias = ours + ('attn', f'{name}_bias', 'bias')
      t.append(_vector(f'{hf}.self_attn.{name}_proj.bias', bias))
  t.append(Tensor(f'{hf}.self_attn.o_proj.weight', (ours + ('attn', 'o'),), 'linear', 2))
  if c.qk_norm:  # Qwen3: one gain [H] each, shared by all heads
    for name in 'qk':
      t += _norm(f'{hf}.self_attn.{name}_norm', ours + ('attn', f'{name}_norm'), 'rms')
  for name in ('gate', 'up', 'down'):
    t.append(Tensor(f'{hf}.mlp.{name}_proj.weight', (ours + ('mlp', name),), 'linear'))
  return t


def _gpt2_layer(c: TransformerConfig, hf: str, ours: Path) -> list[Tensor]:
  attn, mlp = ours + ('attn',), ours + ('mlp',)
  return [
      *_norm(f'{hf}.ln_1', ours + ('attn_norm',), 'layer'),
      Tensor(f'{hf}.attn.c_attn.weight', (attn + ('q',), attn + ('k',), attn + ('v',)), 'conv1d'),
      _vector(f'{hf}.attn.c_attn.bias', *(attn + (f'{n}_bias', 'bias') for n in 'qkv')),
      Tensor(f'{hf}.attn.c_proj.weight', (attn + ('o',),), 'conv1d', 2),
      _vector(f'{hf}.attn.c_proj.bias', attn + ('o_bias', 'bias')),
      *_norm(f'{hf}.ln_2', ours + ('mlp_norm',), 'layer'),
      Tensor(f'{hf}.mlp.c_fc.weight', (mlp + ('up',),), 'conv1d'),
      _vector(f'{hf}.mlp.c_fc.bias', mlp + ('up_bias', 'bias')),
      Tensor(f'{hf}.mlp.c_proj.weight', (mlp + ('down',),), 'conv1d'),
      _vector(f'{hf}.mlp.c_proj.bias', mlp + ('down_bias', 'bias')),
  ]


def _bert_layer(c: TransformerConfig, hf: str, ours: Path) -> list[Tensor]:
  attn, mlp = ours + ('attn',), ours + ('mlp',)
  t = []
  for hf_name, name in (('query', 'q'), ('key', 'k'), ('value', 'v')):
    t.append(Tensor(f'{hf}.attention.self.{hf_name}.weight', (attn + (name,),), 'linear'))
    t.append(_vector(f'{hf}.attention.self.{hf_name}.bias', attn + (f'{name}_bias', 'bias')))
  return t + [
      Tensor(f'{hf}.attention.output.dense.weight', (attn + ('o',),), 'linear', 2),
      _vector(f'{hf}.attention.output.dense.bias', attn + ('o_bias', 'bias')),
      *_norm(f'{hf}.attention.output.LayerNorm', ours + ('attn_norm',), 'layer'),
      Tensor(f'{hf}.intermediate.dense.weight', (mlp + ('up',),), 'linear'),
      _vector(f'{hf}.intermediate.dense.bias', mlp + ('up_bias', 'bias')),
      Tensor(f'{hf}.output.dense.weight', (mlp + ('down',),), 'linear'),
      _vector(f'{hf}.output.dense.bias', mlp + ('down_bias', 'bias')),
      *_norm(f'{hf}.output.LayerNorm', ours + ('mlp_norm',), 'layer'),
  ]


def tensors(config: TransformerConfig, head: HeadConfig | None) -> list[Tensor]:
  """Every tensor a checkpoint of this family may hold for our model, heads included.

  Our paths are those of `Transformer` or, with a head, of `SequenceClassifier`.
  """
  c = config
  root: Path = ('backbone',) if head else ()

  def table(hf: str, *ours: str | int) -> Tensor:
    return Tensor(hf, (root + ours,), 'table')

  if c.family == 'llama':
    t = [table('embed_tokens.weight', 'embedding'), *_norm('norm', root + ('final_norm',), 'rms')]
    layer, hf_layer = _llama_layer, 'layers.{}'
  elif c.family == 'gpt2':
    t = [table('wte.weight', 'embedding'), table('wpe.weight', 'position_embed', 'embedding'),
         *_norm('ln_f', root + ('final_norm',), 'layer')]
    layer, hf_layer = _gpt2_layer, 'h.{}'
  else:
    t = [table('embeddings.word_embeddings.weight', 'embedding'),
         table('embeddings.position_embeddings.weight', 'position_embed', 'embedding'),
         table('embeddings.token_type_embeddings.weight', 'token_type_embed', 'embedding'),
         *_norm('embeddings.LayerNorm', root + ('embed_norm',), 'layer'),
         Tensor('pooler.dense.weight', (('pooler', 'kernel'),), 'linear', group='pooler'),
         _vector('pooler.dense.bias', ('pooler', 'bias'), group='pooler')]
    layer, hf_layer = _bert_layer, 'encoder.layer.{}'
  for i in range(c.num_layers):
    t += layer(c, hf_layer.format(i), root + ('blocks', i))
  top = dict(in_base=False)
  t.append(Tensor('lm_head.weight', ((*root, 'lm_head'),), 'linear', group='lm_head', **top))
  if c.family == 'bert':
    t.append(Tensor('classifier.weight', (('classifier', 'kernel'),), 'linear',
                    group='classifier', **top))
    t.append(_vector('classifier.bias', ('classifier', 'bias'), group='classifier', **top))
  else:
    t.append(Tensor('score.weight', (('classifier', 'kernel'),), 'linear', group='classifier',
                    **top))
  return t


# Checkpoint entries that are not parameters of any model (buffers older transformers saved,
# pretraining heads): dropped on import, by a suffix or prefix of the name without its prefix.
IGNORED_SUFFIXES = ('embeddings.position_ids', '.attn.bias', '.attn.masked_bias',
                    'rotary_emb.inv_freq')
IGNORED_PREFIXES = ('cls.',)  # BertForPreTraining / BertForMaskedLM heads


def hf_shape(t: Tensor, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
  """The shape HF stores tensor `t` in, given the shapes of our parameters it holds."""
  if t.layout == 'table':
    return tuple(shapes[0])
  n_in = math.prod(shapes[0][:t.in_ndim])
  n_out = sum(math.prod(s[t.in_ndim:]) for s in shapes)
  return {'vector': (n_out,), 'conv1d': (n_in, n_out), 'linear': (n_out, n_in)}[t.layout]


def to_ours(t: Tensor, array: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
  """Our parameters from HF tensor `t` (whose shape the caller has checked)."""
  if t.layout == 'table':
    return [array]
  if t.layout == 'linear':
    matrix = array.T  # [in, out]
  elif t.layout == 'conv1d':
    matrix = array
  else:
    matrix = array.reshape(1, -1)
  sizes = [math.prod(s) // matrix.shape[0] for s in shapes]
  parts = np.split(matrix, np.cumsum(sizes)[:-1], axis=1)
  return [np.ascontiguousarray(p).reshape(s) for p, s in zip(parts, shapes)]


def to_hf(t: Tensor, arrays: list[np.ndarray]) -> np.ndarray:
  """HF tensor `t` from our parameters (the inverse of `to_ours`)."""
  if t.layout == 'table':
    return arrays[0]
  n_in = math.prod(arrays[0].shape[:t.in_ndim])
  matrix = np.concatenate([a.reshape(n_in, -1) for a in arrays], axis=1)  # [in, out]
  if t.layout == 'vector':
    return matrix.reshape(-1)
  return np.ascontiguousarray(matrix.T if t.layout == 'linear' else matrix)

"""What distinguishes the supported model families, as one small table.

Llama, GPT-2 and BERT are the same stack of attention and MLP blocks; they differ in a handful
of choices that are fixed per family, not tuned per run. Keeping them here, looked up by
`TransformerConfig.family`, means one model implementation serves all three and a config only
carries the few knobs that really vary between checkpoints of one family (sizes, RoPE theta,
tied embeddings, Qwen2's attention biases, Qwen3's q/k norms, Llama 3's RoPE scaling).
"""

from __future__ import annotations

import dataclasses

NORMS = ('rms', 'layer')
POSITIONS = ('rope', 'learned')
ACTIVATIONS = ('silu', 'gelu_tanh', 'gelu')


@dataclasses.dataclass(frozen=True)
class Family:
  """The fixed architecture choices of one family."""

  norm: str  # 'rms': RMSNorm, scale only; 'layer': LayerNorm with scale and bias.
  # Post-norm (BERT): x = norm(x + f(x)), with a norm on the embeddings and none at the end.
  # Pre-norm (GPT-2, Llama): x = x + f(norm(x)), with a final norm after the last block.
  post_norm: bool
  positions: str  # 'rope': rotary, inside attention; 'learned': an absolute table added.
  activation: str  # The MLP nonlinearity.
  gated_mlp: bool  # down(act(x gate) * (x up)) (SwiGLU) or down(act(x up)).
  bias: bool  # Every projection has a bias (llama gets q/k/v biases from attention_bias).
  causal: bool  # Decoder (each token sees earlier ones) or encoder (sees the whole sequence).


FAMILIES: dict[str, Family] = {
    # Llama 2/3, Mistral, Qwen2, Qwen3 (Touvron et al. 2023).
    'llama': Family(norm='rms', post_norm=False, positions='rope', activation='silu',
                    gated_mlp=True, bias=False, causal=True),
    # GPT-2 (Radford et al. 2019): HF's `gelu_new` is the tanh approximation of GELU.
    'gpt2': Family(norm='layer', post_norm=False, positions='learned', activation='gelu_tanh',
                   gated_mlp=False, bias=True, causal=True),
    # BERT (Devlin et al. 2019) and its distillations (MiniLM): exact erf GELU.
    'bert': Family(norm='layer', post_norm=True, positions='learned', activation='gelu',
                   gated_mlp=False, bias=True, causal=False),
}


def get(name: str) -> Family:
  """The family called `name`; the error names the config field and the choices."""
  if name not in FAMILIES:
    raise ValueError(f'TransformerConfig.family must be one of {tuple(FAMILIES)}, got {name!r}')
  return FAMILIES[name]

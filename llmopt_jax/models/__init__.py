"""Llama-style decoder LM: config and presets, the Flax NNX model, closed-form size and cost."""

from llmopt_jax.models import stats
from llmopt_jax.models.config import PRESETS, TransformerConfig, get_preset
from llmopt_jax.models.transformer import Transformer

__all__ = ['PRESETS', 'Transformer', 'TransformerConfig', 'get_preset', 'stats']

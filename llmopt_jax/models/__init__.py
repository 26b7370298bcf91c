"""Transformers of three families (Llama, GPT-2, BERT) on shared blocks: config and presets,
the Flax NNX model, a sequence-classification head, closed-form size and cost."""

from llmopt_jax.models import stats
from llmopt_jax.models.config import PRESETS, TransformerConfig, get_preset
from llmopt_jax.models.heads import HeadConfig, SequenceClassifier
from llmopt_jax.models.transformer import Transformer

__all__ = ['PRESETS', 'HeadConfig', 'SequenceClassifier', 'Transformer', 'TransformerConfig',
           'get_preset', 'stats']

"""The tiny Shakespeare corpus shipped with llmopt_jax and its TFDS builder."""

from llmopt_jax.data.tiny_shakespeare.builder import TinyShakespeare

__all__ = ['TinyShakespeare']

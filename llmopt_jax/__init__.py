"""llmopt_jax: making language models cheaper and better, in JAX and Flax NNX."""

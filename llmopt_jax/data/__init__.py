"""Input data: text sources, tokenizers and packed language-model batches.

  sources.py           documents of a split as a random-access sequence of str (TFDS)
  tokenizers.py        byte and byte-level BPE tokenizers
  lm_pipeline.py       packed, sharded, resumable LM training batches and eval batches
  tiny_shakespeare/    the shipped corpus and its TFDS builder

Modules are imported by name (`from llmopt_jax.data import sources`) so that importing the
package stays cheap.
"""

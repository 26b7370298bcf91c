"""Hugging Face interchange: safetensors checkpoints and tokenizer.json in, the same out.

    model, config = hf.load_pretrained(hf.minilm_path(), head=HeadConfig(77, 'cls'))
    batch = hf.load_tokenizer(hf.minilm_path(), max_len=64)(texts)
    logits = model(**batch)
    hf.export(model, config, 'runs/ft/hf', tokenizer_dir=hf.minilm_path())

Families: Llama (with Llama 3.x RoPE scaling), Mistral, Qwen2, Qwen3, GPT-2, BERT (see
`configs.ARCHITECTURES`). No PyTorch, and nothing is ever unpickled.
"""

from llmopt_jax.hf.configs import config_from_hf
from llmopt_jax.hf.export import export, export_classifier
from llmopt_jax.hf.load import load_pretrained
from llmopt_jax.hf.minilm import minilm_path
from llmopt_jax.hf.tokenizer import HFTokenizer, load_tokenizer

__all__ = ['HFTokenizer', 'config_from_hf', 'export', 'export_classifier', 'load_pretrained',
           'load_tokenizer', 'minilm_path']

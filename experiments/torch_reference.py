"""The reference side of `bench_vs_torch.py`: our workloads in Hugging Face transformers + torch.

Each model is built from our own `TransformerConfig` through the Hugging Face `config.json`
our exporter writes (`hf.configs.to_hf`), so the sizes, activation, norms, dropout and tied
embeddings are the ones our model has, and a field transformers cannot express fails there
instead of benchmarking a different model. Weights are random: they do not change the time.

The step is what a transformers user runs: forward, loss, `backward`, global-norm clipping
(`clip_grad_norm_`, as the HF Trainer does) and AdamW, fused (the HF Trainer's default
optimizer with torch >= 2.8), with weight decay on matrices only, as ours. The learning-rate
schedule is left out: its value does not change the time of a step. Attention is
transformers' default implementation for the model (SDPA).

torch and transformers are benchmark and test requirements (requirements-test.txt); this file
is only imported by `bench_vs_torch.py`, after it has fixed the thread count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from llmopt_jax.hf import configs as hf_configs
from llmopt_jax.models.config import TransformerConfig
from llmopt_jax.optim import OptimConfig

StepRunner = Callable[[int], None]  # runs n train steps, returns when they are done


def versions() -> str:
  return f'transformers {transformers.__version__} + torch {torch.__version__}'


def set_threads(n: int) -> None:
  """The size of torch's intra-op (OpenMP) thread pool, which its CPU kernels split work over."""
  torch.set_num_threads(n)


def _hf_config(model: TransformerConfig) -> transformers.PreTrainedConfig:
  """transformers' config of our model, float32, with its default attention."""
  fields = hf_configs.to_hf(model.replace(dtype='float32', param_dtype='float32'), None)
  for key in ('architectures', 'dtype'):
    fields.pop(key)
  # No text is generated: GPT-2's default special ids (50256) would only be out of range of a
  # smaller vocabulary.
  fields.update(bos_token_id=None, eos_token_id=None)
  return transformers.AutoConfig.for_model(fields.pop('model_type'), **fields)


class _MeanPoolClassifier(torch.nn.Module):
  """BertModel -> mean over real tokens -> dropout -> linear: our `SequenceClassifier` with
  pooling='mean' on a bert (no pooler: that belongs to 'cls' pooling)."""

  def __init__(self, model: TransformerConfig, num_labels: int):
    super().__init__()
    self.encoder = transformers.BertModel(_hf_config(model), add_pooling_layer=False)
    self.dropout = torch.nn.Dropout(model.dropout_rate)
    self.classifier = torch.nn.Linear(model.embed_dim, num_labels)

  def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    mask = batch['padding_mask']
    hidden = self.encoder(input_ids=batch['tokens'], token_type_ids=batch['token_types'],
                          attention_mask=mask).last_hidden_state            # [B, T, D]
    real = mask.unsqueeze(-1).to(hidden.dtype)                               # [B, T, 1]
    pooled = (hidden * real).sum(1) / real.sum(1).clamp(min=1e-9)            # [B, D]
    return self.classifier(self.dropout(pooled))


def _adamw(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
  """AdamW of `optim`'s lr, betas, eps and decay; decay on matrices but not on embedding
  tables unless optim.decay_embeddings (our `optim.decay_mask`)."""
  tables = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding)
            for p in m.parameters()}
  decay, rest = [], []
  for p in model.parameters():
    decays = p.ndim >= 2 and (optim.decay_embeddings or id(p) not in tables)
    (decay if decays else rest).append(p)
  groups = [{'params': decay, 'weight_decay': optim.weight_decay},
            {'params': rest, 'weight_decay': 0.0}]
  return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps,
                           fused=True)


def _tensors(batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
  """Our batch as torch tensors: ids and labels int64 (what nn.Embedding and cross entropy
  take), masks int64 (HF's attention_mask), weights float32."""
  return {k: torch.from_numpy(np.asarray(v, np.float32 if k == 'weights' else np.int64))
          for k, v in batch.items()}


def _runner(model: torch.nn.Module, optim: OptimConfig,
            loss_fn: Callable[[], torch.Tensor]) -> StepRunner:
  """n train steps of `model` on `loss_fn()`: backward, clipping, AdamW."""
  optimizer = _adamw(model, optim)
  params = [p for p in model.parameters()]
  model.train()

  def run(n: int) -> None:
    for _ in range(n):
      optimizer.zero_grad(set_to_none=True)
      loss_fn().backward()
      if optim.clip_norm:
        torch.nn.utils.clip_grad_norm_(params, optim.clip_norm)
      optimizer.step()
  return run


def lm_steps(model: TransformerConfig, optim: OptimConfig,
             batch: Mapping[str, np.ndarray]) -> StepRunner:
  """GPT2LMHeadModel (or the family's causal LM) on next-token cross entropy over `inputs` ->
  `targets`, as our `losses.lm_loss` (every position weighted 1 here)."""
  lm = transformers.AutoModelForCausalLM.from_config(_hf_config(model))
  b = _tensors(batch)

  def loss() -> torch.Tensor:
    logits = lm(input_ids=b['inputs']).logits                                # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1), b['targets'].flatten())
  return _runner(lm, optim, loss)


def classifier_steps(model: TransformerConfig, num_labels: int, optim: OptimConfig,
                     batch: Mapping[str, np.ndarray], label_smoothing: float = 0.0
                     ) -> StepRunner:
  """A mean-pooling BERT classifier on cross entropy."""
  classifier = _MeanPoolClassifier(model, num_labels)
  b = _tensors(batch)
  return _runner(classifier, optim, lambda: F.cross_entropy(
      classifier(b), b['labels'], label_smoothing=label_smoothing))


def distill_steps(teacher: TransformerConfig, student: TransformerConfig, num_labels: int,
                  optim: OptimConfig, batch: Mapping[str, np.ndarray], *, alpha: float,
                  temperature: float) -> StepRunner:
  """The student's step on (1 - alpha) cross entropy + alpha T^2 KL(teacher || student) of
  logits at temperature T, the teacher run without gradients or dropout inside each step."""
  teacher_model = _MeanPoolClassifier(teacher, num_labels).eval()
  teacher_model.requires_grad_(False)
  student_model = _MeanPoolClassifier(student, num_labels)
  b = _tensors(batch)

  def loss() -> torch.Tensor:
    with torch.no_grad():
      target = F.log_softmax(teacher_model(b) / temperature, dim=-1)
    logits = student_model(b)
    kd = F.kl_div(F.log_softmax(logits / temperature, dim=-1), target, log_target=True,
                  reduction='batchmean') * temperature**2
    return (1 - alpha) * F.cross_entropy(logits, b['labels']) + alpha * kd
  return _runner(student_model, optim, loss)

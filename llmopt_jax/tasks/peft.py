"""What the fine-tunes share about what trains: LoRA's `Task` fields and parameter counts."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from llmopt_jax import lora, optim
from llmopt_jax.train.task import Task


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  trainable: int
  total: int

  @property
  def percent(self) -> float:
    return 100 * self.trainable / self.total


def lora_fields(lora_cfg: lora.LoraConfig | None, seed: int) -> dict[str, Any]:
  """The `Task` fields of LoRA (none without it): adapters added at init, merged in every
  step, base weights frozen."""
  if lora_cfg is None:
    return {}
  return dict(
      extend_params=lambda p: lora.add_adapters(p, lora_cfg, jax.random.key(seed)),
      params_transform=lora.params_transform(lora_cfg),
      frozen=lora.is_frozen(lora_cfg))


def count_params(task: Task, freeze: str | Sequence[str]) -> ParamCounts:
  """Trainable and total entries of the task's trainable tree, from shapes alone; `freeze`:
  `config.optim.freeze`'s patterns."""
  def params():
    p = nnx.state(task.build_model(nnx.Rngs(0)), nnx.Param)
    return p if task.extend_params is None else task.extend_params(p)
  abstract = jax.eval_shape(params)
  mask = optim.trainable_mask(abstract, freeze, task.frozen)
  return ParamCounts(*lora.count_trainable(abstract, mask))


def describe(model_dir: str, source: str, data: str, counts: ParamCounts, method: str) -> str:
  """One line on what is fine-tuned on what, and how much of it trains."""
  return (f'Fine-tuning {model_dir} ({source}) on {data}; trainable parameters '
          f'{counts.trainable:,} of {counts.total:,} ({counts.percent:.2f}%, peft={method}).')

"""A distillation's transfer set: text the teacher labels and the student has no labels for.

  config.distill.transfer = 'rest'         # '' = off; or a .txt/.csv/.tsv/.jsonl of texts
  config.distill.transfer_batch_size = 32  # transfer rows per step, beside the labelled ones

Where labels run out (a few-shot split), the teacher can still label text: TinyBERT (Jiao et
al., 2020) and MixKD (Liang et al., 2021) distil on an augmented transfer set many times the
labelled one. Two sources of such text feed an online distillation here:

  * augmented copies (config.data.augment): in online mode the teacher runs in the step on the
    batch's own text, so the student learns the teacher's logits on the augmented copies
    (which also keep their label, as any augmented row does);
  * unlabelled text (this file): 'rest', the training examples a few-shot cut left out
    (`few_shot.py`; their labels are never read), or a user's file.

How rows are mixed: every step reads its B labelled rows and, beside them, R transfer rows in
a stream of their own (`data/unlabelled.py`: its own order and epochs, resumed exactly). The
objective sees them as one batch of B + R rows in which the transfer rows have label weight 0
and distillation weight 1, so

    objective = (1 - alpha) * CE over the B labelled rows
              + alpha * KD over all B + R rows (each row counted once)
              + the hidden and attention terms, over the tokens of all B + R rows

The label-only student of the same run reads the same batches and ignores the transfer rows.
The teacher's logits of a transfer row exist only online: the cached teacher holds the logits
of the original training texts alone, so cached mode refuses a transfer set and augmentation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from llmopt_jax.data import unlabelled
from llmopt_jax.data.augment.config import AugmentConfig
from llmopt_jax.data.unlabelled import UnlabelledConfig

FIELD = 'config.distill.transfer'


def transfer_source(distill: Mapping[str, Any]) -> str:
  """`config.distill.transfer`, checked to be a string ('' = off)."""
  source = distill.get('transfer', '')
  if not isinstance(source, str):
    raise ValueError(  # noqa: TRY004
        f"{FIELD}={source!r} must be '' (off), 'rest' or a file of texts")
  return source


def transfer_stream(config: Mapping[str, Any]) -> UnlabelledConfig | None:
  """The transfer rows the training batches carry, or None: off, or no distill section."""
  distill = config.get('distill')
  if distill is None or not transfer_source(distill):
    return None
  if config.get('task', 'classification') != 'classification':
    raise ValueError(f"{FIELD}={distill['transfer']!r}: transfer sets are for the "
                     f"classification tasks (a language model's corpus is its own)")
  return UnlabelledConfig.check(
      distill['transfer'], distill.get('transfer_batch_size'), AugmentConfig(),
      labelled_batch=config['train']['batch_size'],
      shots=config['data'].get('shots_per_class', 0), field=FIELD,
      size_field=f'{FIELD}_batch_size')


def with_transfer_rows(batch: Mapping[str, jax.Array], kd_weights: jax.Array
                       ) -> tuple[dict[str, jax.Array], jax.Array]:
  """(the batch with its transfer rows appended, the KD weights of all rows).

  Appended rows take label 0 at label weight 0, so every hard-label metric sums over the
  labelled rows alone, and KD weight 1. `kd_weights` are the labelled rows' ([B]).
  """
  extra = unlabelled.view(batch, unlabelled.CLEAN)
  rows = extra['tokens'].shape[0]
  combined = {**batch, **{k: jnp.concatenate([batch[k], v]) for k, v in extra.items()}}
  for key in ('labels', 'weights'):
    combined[key] = jnp.concatenate([batch[key], jnp.zeros((rows,), batch[key].dtype)])
  return combined, jnp.concatenate([kd_weights, jnp.ones((rows,), kd_weights.dtype)])

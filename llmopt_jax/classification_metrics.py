"""Classification metrics: sums inside jit, a report on the host.

Inside the step, a batch contributes (sum, count) pairs like every other metric: the loss,
the number correct, and a confusion matrix of counts [C, C] (rows the true class, columns the
predicted one). Counts add exactly across batches, devices and processes, so accuracy and
macro-F1 come out the same however the evaluation set was split; `metrics.total` adds the
matrices and `metrics.finalize` turns one into `macro_f1`. The full per-class report, too long
for a log line, is `classification_report` of the summed matrix.

For CLINC150 (Larson et al., 2019) the report adds the figures that paper uses for its
out-of-scope class: accuracy over in-scope queries and recall of out-of-scope ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llmopt_jax import losses, metrics
from llmopt_jax.metrics import MetricSums


def confusion_matrix(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  """float32[C, C]: summed weights of examples of true class i predicted as class j.

  One einsum of one-hot codes rather than a scatter: it partitions over a sharded batch into
  local sums and one all-reduce. Counts are exact in float32 up to 2**24 per batch; HIGHEST
  precision keeps accelerators from rounding fractional weights through bf16 passes.
  """
  num_classes = logits.shape[-1]
  truth = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)          # [B, C]
  predicted = jax.nn.one_hot(jnp.argmax(logits, axis=-1), num_classes, dtype=jnp.float32)
  return jnp.einsum('BC,BD->CD', truth * weights.astype(jnp.float32)[:, None], predicted,
                    precision=jax.lax.Precision.HIGHEST)


def classification_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array, *,
                        label_smoothing: float = 0.0, confusion: bool = True) -> MetricSums:
  """{'loss', 'accuracy', 'confusion'} as (sum, count) pairs for one batch, inside jit.

  logits: [B, C]; labels: [B] int; weights: [B]. `loss` is the smoothed objective (see
  `losses.classification_loss`); `confusion=False` leaves the [C, C] matrix out where it is
  not needed, e.g. in training metrics.
  """
  weights = weights.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  count = jnp.sum(weights)
  sums = {
      'loss': losses.classification_loss(logits, labels, weights, label_smoothing),
      'accuracy': (jnp.sum(correct * weights), count),
  }
  if confusion:
    sums['confusion'] = (confusion_matrix(logits, labels, weights), count)
  return sums


def classification_report(confusion: np.ndarray, label_names: Sequence[str] | None = None,
                          out_of_scope: str | None = None) -> dict[str, Any]:
  """Accuracy, macro-F1 and per-class F1 from a summed confusion matrix, JSON-ready.

  Macro-F1 is the mean of F1_c = 2 TP / (2 TP + FP + FN) over the classes that occur in the
  labels or the predictions (see `metrics.macro_f1`); a class absent from both gets F1 None
  in `per_class_f1` and does not count. With `out_of_scope` naming a class (CLINC150's 'oos'),
  the report adds `in_scope_accuracy` and `out_of_scope_recall`.
  """
  confusion = np.asarray(confusion, np.float64)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f'a confusion matrix must be square [C, C], got shape {confusion.shape}')
  num_classes = confusion.shape[0]
  names = list(label_names) if label_names is not None else [str(c) for c in range(num_classes)]
  if len(names) != num_classes:
    raise ValueError(f'{len(names)} label names for a {num_classes}-class confusion matrix')
  f1, occurs = metrics.f1_per_class(confusion)
  support = confusion.sum(axis=1)
  total = float(confusion.sum())
  report = {
      'num_examples': total,
      'accuracy': float(np.trace(confusion) / total) if total else float('nan'),
      'macro_f1': metrics.macro_f1(confusion),
      'classes_scored': int(occurs.sum()),
      'per_class_f1': {name: (float(f) if ok else None)
                       for name, f, ok in zip(names, f1, occurs)},
      'support': {name: float(s) for name, s in zip(names, support)},
  }
  if out_of_scope is not None:
    if out_of_scope not in names:
      raise ValueError(f'out-of-scope class {out_of_scope!r} is not a label name')
    k = names.index(out_of_scope)
    inside = np.arange(num_classes) != k
    in_scope = confusion[inside].sum()
    report['in_scope_accuracy'] = (float(np.diag(confusion)[inside].sum() / in_scope)
                                   if in_scope else float('nan'))
    report['out_of_scope_recall'] = (float(confusion[k, k] / support[k])
                                     if support[k] else float('nan'))
  return report

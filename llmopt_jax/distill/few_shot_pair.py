"""The distillation table's second pair of students: where labels run out.

On the whole of Banking77 a 2-layer student learns as much from the labels as from its
teacher, so the first pair of students (label-only against distilled) shows no gain. The gain
appears when the students have K labelled examples per class and the teacher labels the rest
of the training split as a transfer set (experiments/results/few_shot_distill_banking77.md).
The second pair is that setting, trained after the first with the same teacher and the same
student fields, so the table holds both answers side by side.

Its config is the run's own with the few-shot fields changed: K shots per class (drawn with
the run's seed), the rest of the split as the distilled student's transfer set (online mode:
the teacher scores those texts in the step), a schedule of `num_steps` with a tenth as warmup
and validation at every half. The teacher stays the one the run has, trained on the whole
split (`config.teacher.shots_per_class = 0`). Fields: `config.few_shot_pair`
(configs/distill.py).
"""

from __future__ import annotations

import ml_collections

FIELD = 'config.few_shot_pair'


def pair_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """The second pair's whole config; None where there is none (shots_per_class 0, a run
  whose first pair is already few-shot, or a task without labels to cut)."""
  fields = config.get('few_shot_pair')
  if fields is None:
    return None
  shots, steps = fields.shots_per_class, fields.num_steps
  for name, value, low in (('shots_per_class', shots, 0), ('num_steps', steps, 1)):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f'{FIELD}.{name}={value!r}; must be an integer >= {low}')
  if not shots or config.get('task') != 'classification' or config.data.shots_per_class:
    return None
  pair = config.copy_and_resolve_references()
  pair.data.shots_per_class = shots
  pair.teacher.shots_per_class = 0        # the run's teacher, trained on the whole split
  pair.distill.mode = 'online'            # the transfer set needs the teacher in the step
  pair.distill.transfer = 'rest'
  pair.train.num_steps = steps
  pair.optim.warmup_steps = steps // 10
  pair.train.eval_every = pair.checkpoint.every_steps = max(1, steps // 2)
  return pair


def suffix(pair: ml_collections.ConfigDict) -> str:
  """What the pair's students' names and directories end with: `_<K>shot`."""
  return f'_{pair.data.shots_per_class}shot'


def describe(pair: ml_collections.ConfigDict) -> str:
  """A report note on what the pair's rows are."""
  return (f'Rows *{suffix(pair)}: the same two students with {pair.data.shots_per_class} '
          f'labelled queries per class, {pair.train.num_steps} steps; the distilled one also '
          f'learns from the teacher\'s predictions on the rest of the training split (a '
          f'transfer set), whose labels no student reads.')

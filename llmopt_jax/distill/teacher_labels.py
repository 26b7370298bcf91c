"""Which labels the teacher of a few-shot distillation learns from.

  config.data.shots_per_class = 10      # the students' labelled examples per class
  config.teacher.shots_per_class = -1   # -1 = the same cut as the students (the default)
                                        # 0 = the whole training split; K = K per class

Two settings answer different questions. With the same cut (-1) nobody has more labels than
the students: labels have run out, and whatever the distilled student gains over the label-only
one comes from the teacher's capacity and pretraining carried over on text without labels (a
transfer set, augmented copies). That is the setting of issue 16, and the default. A teacher
fine-tuned on the whole split (0) is TinyBERT's and MixKD's: a strong teacher exists and only
the small model is short of labels; the gain then also includes the labels the teacher saw.

A teacher's K-shot subset is drawn with the students' few-shot seed (`config.data.shots_seed`,
or `config.seed`), so a teacher with more shots than the students has seen all of their
examples and more (few-shot subsets of one seed are nested). A teacher trained in
<workdir>/teacher gets the cut in its config; a finished one (config.teacher.workdir, or a
teacher left by an earlier run) is checked to have been trained on it.
"""

from __future__ import annotations

import ml_collections

from llmopt_jax.data.few_shot import FewShotConfig
from llmopt_jax.tasks.finished import FinishedModel

FIELD = 'config.teacher.shots_per_class'


def teacher_cut(config: ml_collections.ConfigDict) -> FewShotConfig | None:
  """The few-shot cut the teacher trains on (shots 0 = the whole split); None for tasks
  without one (language modelling)."""
  if config.get('task', 'classification') != 'classification':
    return None
  students = FewShotConfig.from_config(config.data, config.seed)
  shots = config.teacher.get('shots_per_class', -1)
  if isinstance(shots, bool) or not isinstance(shots, int) or shots < -1:
    raise ValueError(f'{FIELD}={shots!r} must be -1 (the students\' cut, '
                     f'config.data.shots_per_class), 0 (the whole split) or K > 0')
  return students if shots == -1 else FewShotConfig(shots, students.seed)


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.teacher.config` (what a teacher trained in the workdir runs) with its cut."""
  cut = teacher_cut(config)
  derived = config.teacher.config.copy_and_resolve_references()
  if cut is not None:
    derived.data.shots_per_class = cut.shots
    if cut.shots:
      derived.data.shots_seed = cut.seed
  return derived


def check_teacher(config: ml_collections.ConfigDict, teacher: FinishedModel) -> None:
  """The finished teacher was trained on the cut `config` asks for."""
  want = teacher_cut(config)
  if want is None or 'data' not in teacher.config:
    return
  got = FewShotConfig.from_config(teacher.config.data, teacher.config.get('seed', 0))
  if (got.shots, got.seed if got.shots else 0) != (want.shots, want.seed if want.shots else 0):
    raise ValueError(f'{FIELD}={config.teacher.get("shots_per_class", -1)} asks for a teacher '
                     f'trained on {_describe(want)}, but the one in {teacher.workdir} saw '
                     f'{_describe(got)}; set {FIELD} to match it, or use another teacher')


def _describe(cut: FewShotConfig) -> str:
  return (f'{cut.shots} examples per class (seed {cut.seed})' if cut.shots else
          'the whole training split')

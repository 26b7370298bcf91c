"""Multi-task classification batches: one task per batch, chosen by the mixture, each row
tagged with its task and its label moved into the task's block of one shared classifier.

All tasks share one classifier of sum_t C_t outputs, and task t owns the block of columns
[start_t, start_t + C_t) (`LabelBlocks`, in the order the tasks are listed). Keeping the
task's label ids and shifting them by start_t on the host lets every metric that works on
plain labels (accuracy, a confusion matrix) work unchanged on the whole classifier; the
model masks the columns outside a row's block (`tasks/multitask.py`).

Every training batch comes from one task, the one `TaskMixture` (data/mixture.py) names next,
drawn from that task's own `ClassificationBatches` pipeline: a batch is then exactly what a
single-task run of the task reads, and a step runs one compiled program whatever the task.
The position of the whole stream is the mixer's per-task batch counts plus each task's own
pipeline position, JSON-ready, so a resumed run reads the very batches an uninterrupted one
would.

A task's texts come from its own config section (`TaskSource`): a shipped set or a user's
CSV/TSV/JSONL file with its own text and label columns,

  config.tasks.mine.dataset = 'file'    config.tasks.mine.path = 'tickets.csv'
  config.tasks.mine.text_field = 'body' config.tasks.mine.label_field = 'queue'

Keys besides those of data/classification.py:
  task    int32[b]  the task's index in `LabelBlocks.names`, the same for every row
  labels  int32[b]  the row's label id within its task + that task's block start
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from llmopt_jax.data import intents
from llmopt_jax.data.classification import Batch
from llmopt_jax.data.labelled import LabelledSplits
from llmopt_jax.data.mixture import TaskMixture

# Separates the task from the class in the label names of a multi-task model card.
SEPARATOR = '/'
DATASETS = ('banking77', 'clinc150', intents.USER_FILE)
# Task names become metric keys (eval/<task>/accuracy) and directory names (single_<task>).
_TASK_NAME = re.compile(r'[A-Za-z0-9_][A-Za-z0-9_.-]*')


@dataclasses.dataclass(frozen=True)
class TaskSource:
  """Where one task's labelled texts come from: its section `config.tasks.<name>`."""
  name: str
  dataset: str                      # one of DATASETS
  path: str = ''                    # dataset 'file': the training file
  text_field: str = 'text'
  label_field: str = 'label'
  validation_path: str = ''         # '' = carve validation_fraction out of train
  test_path: str = ''               # a file task needs one: the report scores test
  validation_fraction: float = 0.1

  @property
  def field(self) -> str:
    return f'config.tasks.{self.name}'

  @classmethod
  def from_config(cls, name: str, section: Mapping[str, Any] | None) -> TaskSource:
    """Task `name`'s section, checked; every error is one line naming the field."""
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
      raise ValueError(f'config.multitask.tasks: task name {name!r} must be letters, digits, '
                       f"'_', '-' or '.' (it names metrics and directories)")
    if section is None:
      raise ValueError(f'config.multitask.tasks names {name!r}, but config.tasks.{name} does '
                       f'not exist; define it or remove the name')
    known = {f.name for f in dataclasses.fields(cls)} - {'name'}
    if unknown := sorted(set(section) - known):
      raise ValueError(f'config.tasks.{name}.{unknown[0]}: unknown field; known: {sorted(known)}')
    source = cls(name, **dict(section))
    if source.dataset not in DATASETS:
      raise ValueError(f'{source.field}.dataset={source.dataset!r}; choose from {list(DATASETS)}')
    if source.dataset == intents.USER_FILE and not (source.path and source.test_path):
      missing = 'path' if not source.path else 'test_path'
      raise ValueError(f"{source.field}.{missing} must name a CSV/TSV/JSONL file (dataset "
                       f"'{intents.USER_FILE}'; the report scores each task's test split)")
    return source

  def load(self) -> LabelledSplits:
    """Train, validation and test; a problem with the files names the field it comes from."""
    try:
      return intents.load(
          self.dataset, path=self.path, text_field=self.text_field,
          label_field=self.label_field, validation_path=self.validation_path,
          test_path=self.test_path, validation_fraction=self.validation_fraction)
    except (ValueError, FileNotFoundError) as e:
      raise type(e)(f'{self._blame(str(e))}: {e}') from None

  def _blame(self, message: str) -> str:
    for field in ('label_field', 'text_field'):
      value = getattr(self, field)
      if f'column {value!r}' in message:
        return f'{self.field}.{field}={value!r}'
    return self.field


@dataclasses.dataclass(frozen=True)
class LabelBlocks:
  """Which columns of the shared classifier belong to which task."""
  names: tuple[str, ...]   # tasks, in block order
  sizes: tuple[int, ...]   # classes of each task

  @property
  def starts(self) -> tuple[int, ...]:
    return tuple(int(s) for s in np.cumsum((0, *self.sizes[:-1])))

  @property
  def total(self) -> int:
    return sum(self.sizes)

  def span(self, name: str) -> tuple[int, int]:
    """[start, end) of task `name`'s columns."""
    k = self.names.index(name)
    return self.starts[k], self.starts[k] + self.sizes[k]

  def tag(self, batch: Batch, name: str) -> Batch:
    """A batch of task `name` as the shared classifier reads it (a new dict)."""
    k = self.names.index(name)
    rows = len(batch['labels'])
    return {**batch, 'labels': (batch['labels'] + self.starts[k]).astype(np.int32),
            'task': np.full(rows, k, np.int32)}

  def label_names(self, per_task: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """'task/class' for every column, the labels of a multi-task model card."""
    return tuple(f'{name}{SEPARATOR}{label}'
                 for name, labels in zip(self.names, per_task, strict=True) for label in labels)

  @classmethod
  def from_label_names(cls, labels: Sequence[str]) -> LabelBlocks:
    """The blocks of a model card's 'task/class' labels (tasks hold no separator, classes
    may), so a later stage can split a multi-task classifier's outputs by task."""
    names: list[str] = []
    sizes: list[int] = []
    for label in labels:
      task, sep, _ = label.partition(SEPARATOR)
      if not sep:
        raise ValueError(f'label {label!r} is not task{SEPARATOR}class')
      if names and names[-1] == task:
        sizes[-1] += 1
      elif task in names:
        raise ValueError(f'the labels of task {task!r} are not contiguous')
      else:
        names.append(task)
        sizes.append(1)
    return cls(tuple(names), tuple(sizes))


class Resumable(Protocol, Iterator[Batch]):
  """A task's training batches with a JSON-ready position (the loop's ResumableIterator)."""

  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...


class MixedBatches:
  """Training batches of several tasks, in the mixture's order (see the module docstring)."""

  def __init__(self, tasks: Mapping[str, Resumable], blocks: LabelBlocks,
               mixture: TaskMixture):
    if set(tasks) != set(blocks.names) or set(mixture.tasks) != set(blocks.names):
      raise ValueError(f'tasks {sorted(tasks)}, blocks {sorted(blocks.names)} and mixture '
                       f'{sorted(mixture.tasks)} must name the same tasks')
    self._tasks, self._blocks, self._mixture = dict(tasks), blocks, mixture

  def __iter__(self) -> MixedBatches:
    return self

  def __next__(self) -> Batch:
    name = self._mixture.next()
    return self._blocks.tag(next(self._tasks[name]), name)

  def get_state(self) -> dict:
    return {'mixture': self._mixture.get_state(),
            'tasks': {name: it.get_state() for name, it in self._tasks.items()}}

  def set_state(self, state: dict) -> None:
    if set(state) != {'mixture', 'tasks'} or set(state['tasks']) != set(self._tasks):
      raise ValueError(f'data state with keys {sorted(state)} is not the state of a mixture '
                       f'of tasks {sorted(self._tasks)}: the run was started otherwise')
    self._mixture.set_state(state['mixture'])
    for name, it in self._tasks.items():
      it.set_state(state['tasks'][name])

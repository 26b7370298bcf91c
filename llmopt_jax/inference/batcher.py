"""Batching a stream of requests: one worker thread owns the model, callers get futures.

A server receives requests one at a time, from many clients at once. Each request is put on
a bounded waiting line and answered through a `concurrent.futures.Future`; one worker thread
takes from the line and runs the model, so requests that wait together are computed together
and nothing else touches the device state.

  generation      `Slots` (continuous batching): a waiting request is prefilled into a slot
                  as soon as one is free, and all running rows decode together, `steps` tokens
                  per round, so a new request waits at most one round to join the batch;
  classification  every waiting text (up to one batch) goes into the next forward pass.

The line is bounded: past `queue_size` waiting requests `submit` raises `QueueFull` at once
(a server answers 503, the client retries later) instead of letting latency grow without
limit. A caller whose future was cancelled before its turn (its client went away) is
skipped; a running row is not interrupted. `stop` ends the worker; whatever is still waiting
or running then fails with `Stopped`, so no caller waits forever.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from llmopt_jax.inference.engine import bucket
from llmopt_jax.inference.sampling import SamplingParams
from llmopt_jax.inference.slots import Slots
from llmopt_jax.inference.text import TextGenerator, stop_index

_log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.1  # how often an idle worker looks at its stop flag


class QueueFull(RuntimeError):
  """The waiting line has no room for the request."""


class Stopped(RuntimeError):
  """The worker stopped before the request was answered."""


class WaitingLine:
  """A thread-safe FIFO of at most `capacity` items; a request's items enter all or none."""

  def __init__(self, capacity: int):
    if capacity < 1:
      raise ValueError(f'the queue size must be at least 1, got {capacity}')
    self.capacity = capacity
    self._items: collections.deque = collections.deque()
    self._changed = threading.Condition()

  def __len__(self) -> int:
    return len(self._items)

  def put_all(self, items: Sequence[Any]) -> None:
    with self._changed:
      if len(self._items) + len(items) > self.capacity:
        raise QueueFull(f'the server is busy ({len(self._items)} requests waiting, at most '
                        f'{self.capacity}); retry later')
      self._items.extend(items)
      self._changed.notify()

  def take(self, most: int, wait_s: float) -> list[Any]:
    """Up to `most` items, oldest first; waits up to `wait_s` for the first if none."""
    with self._changed:
      if not self._items and wait_s > 0:
        self._changed.wait(wait_s)
      return [self._items.popleft() for _ in range(min(most, len(self._items)))]

  def wake(self) -> None:
    with self._changed:
      self._changed.notify_all()


class _Worker:
  """A daemon thread calling `step()` until stopped; `step` must return within ~IDLE_WAIT_S
  when there is nothing to do."""

  def __init__(self, name: str, step: Callable[[], None], line: WaitingLine):
    self._name, self._step, self._line = name, step, line
    self._stopping = threading.Event()
    self._thread: threading.Thread | None = None

  @property
  def stopping(self) -> bool:
    return self._stopping.is_set()

  def start(self) -> None:
    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
    self._thread.start()

  def stop(self, timeout_s: float = 60.0) -> None:
    self._stopping.set()
    self._line.wake()
    if self._thread is not None:
      self._thread.join(timeout_s)

  def _run(self) -> None:
    while not self._stopping.is_set():
      self._step()


@dataclasses.dataclass(frozen=True)
class GenerationJob:
  prompt: str                # the text the ids came from (a chat: the rendered template)
  ids: np.ndarray            # checked by `TextGenerator.encode`
  params: SamplingParams
  future: Future             # -> text.Completion


class GenerationBatcher:
  """Continuous batching of generation requests over one `TextGenerator`'s engine."""

  def __init__(self, generator: TextGenerator, *, queue_size: int, steps: int = 8):
    self.generator, self.steps = generator, steps
    engine = generator.engine
    self.slots = Slots(engine, prompt_length=bucket(engine.max_prompt_tokens),
                       output_length=bucket(engine.max_new_tokens))
    self.line = WaitingLine(queue_size)
    self.counts: collections.Counter = collections.Counter()
    self._engine_stats: dict[str, int] = {}   # a copy, made by the worker (which mutates them)
    self._running: dict[int, GenerationJob] = {}
    self._worker = _Worker('generation-batcher', self._step, self.line)
    self.start = self._worker.start

  def submit(self, requests: Sequence[tuple[str, np.ndarray, SamplingParams]]) -> list[Future]:
    """Futures of the requests' `Completion`s, in order; QueueFull if they do not fit."""
    jobs = [GenerationJob(text, ids, params, Future()) for text, ids, params in requests]
    return _enqueue(self.line, self.counts, jobs)

  def stats(self) -> dict[str, int]:
    return {**self._engine_stats, **_counts(self.counts), 'queue_depth': len(self.line),
            'running': len(self._running)}

  def stop(self) -> None:
    self._worker.stop()
    _fail([*self._running.values(), *self.line.take(self.line.capacity, 0)],
          Stopped('the server is shutting down'))

  def warm_up(self) -> None:
    """Compiles prefill (the shortest prompt bucket), insert and decode before any client
    waits for them; run before `start`."""
    future = self.submit([('', np.zeros(1, np.int32), SamplingParams(max_new_tokens=1))])[0]
    while not future.done():
      self._step()
    self.counts.clear()

  def _step(self) -> None:
    free = self.slots.owners.count(None)
    for job in self.line.take(free, 0 if self._running else IDLE_WAIT_S):
      if job.future.set_running_or_notify_cancel():  # False: its caller has gone
        self._admit(job)
    if self._running:
      try:
        finished = self.slots.advance(self.steps, self._should_stop)
      except Exception as e:  # noqa: BLE001  (the server outlives a failed step)
        self._reset(e)
        return
      # Counted before answering: a client that reads the stats after its answer sees it.
      self._engine_stats = dict(self.generator.engine.stats)
      for owner, generated in finished.items():
        job = self._running.pop(owner)
        self.counts['completed'] += 1
        job.future.set_result(self.generator.finish(job.prompt, len(job.ids), generated,
                                                    job.params.stop))

  def _admit(self, job: GenerationJob) -> None:
    owner = id(job)
    try:
      self.slots.admit(owner, job.ids, job.params)
    except Exception as e:  # noqa: BLE001  (one bad request fails alone)
      self.counts['failed'] += 1
      job.future.set_exception(e)
      return
    self._running[owner] = job

  def _should_stop(self, owner: int, tokens: np.ndarray) -> bool:
    stop = self._running[owner].params.stop
    return bool(stop) and stop_index(self.generator.tokenizer.decode(tokens), stop) is not None

  def _reset(self, error: Exception) -> None:
    """After a failed decode the slots' state may be gone (donated): fail the running rows
    and start over with empty slots."""
    _log.exception('generation step failed; failing %d running requests', len(self._running))
    self.counts['failed'] += len(self._running)
    _fail(list(self._running.values()), error)
    self._running.clear()
    self.slots = Slots(self.generator.engine, prompt_length=self.slots.prompt_length,
                       output_length=self.slots.output_length)


@dataclasses.dataclass(frozen=True)
class ClassificationJob:
  text: str
  future: Future             # -> float32 [C] probabilities


class ClassificationBatcher:
  """Texts waiting together go through one forward pass of `classifier` (`Classifier`)."""

  def __init__(self, classifier, *, queue_size: int, batch_rows: int):
    self.classifier, self.batch_rows = classifier, batch_rows
    self.labels: tuple[str, ...] = tuple(classifier.labels)
    self.line = WaitingLine(queue_size)
    self.counts: collections.Counter = collections.Counter()
    self._worker = _Worker('classification-batcher', self._step, self.line)
    self.start = self._worker.start

  def submit(self, texts: Sequence[str]) -> list[Future]:
    return _enqueue(self.line, self.counts, [ClassificationJob(text, Future()) for text in texts])

  def stats(self) -> dict[str, int]:
    return {'batches': 0, 'max_rows': 0, **_counts(self.counts), 'queue_depth': len(self.line)}

  def stop(self) -> None:
    self._worker.stop()
    _fail(self.line.take(self.line.capacity, 0), Stopped('the server is shutting down'))

  def warm_up(self) -> None:
    self.classifier.predict([''])

  def _step(self) -> None:
    jobs = [job for job in self.line.take(self.batch_rows, IDLE_WAIT_S)
            if job.future.set_running_or_notify_cancel()]
    if not jobs:
      return
    try:
      probabilities = self.classifier.predict([job.text for job in jobs])  # [n, C]
    except Exception as e:  # noqa: BLE001  (the server outlives a failed batch)
      _log.exception('classification batch failed')
      self.counts['failed'] += len(jobs)
      _fail(jobs, e)
      return
    self.counts.update(batches=1, completed=len(jobs))
    self.counts['max_rows'] = max(self.counts['max_rows'], len(jobs))
    for job, row in zip(jobs, probabilities, strict=True):
      job.future.set_result(row)


def _counts(counts: collections.Counter) -> dict[str, int]:
  """Requests accepted, answered, refused (line full) and failed; 0 until one happens."""
  return {'requests': 0, 'completed': 0, 'rejected': 0, 'failed': 0, **counts}


def _fail(jobs: Sequence[Any], error: Exception) -> None:
  """Fails every job's future that is still owed an answer (running, or pending and not
  cancelled by its caller)."""
  for job in jobs:
    future = job.future
    if not future.done() and (future.running() or future.set_running_or_notify_cancel()):
      future.set_exception(error)

def _enqueue(line: WaitingLine, counts: collections.Counter, jobs: list) -> list[Future]:
  """Puts all `jobs` in the line (or none: QueueFull, counted as rejected); their futures."""
  try:
    line.put_all(jobs)
  except QueueFull:
    counts['rejected'] += len(jobs)
    raise
  counts['requests'] += len(jobs)
  return [job.future for job in jobs]

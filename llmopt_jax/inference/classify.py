"""Texts -> class probabilities with a loaded classifier, in fixed-shape batches on the mesh.

Shapes: every batch has `batch_size` rows (the last one filled up with empty texts) and one of
a few bucket lengths (16, 32, 64, ... up to the trained max_len): the shortest that holds its
longest text. A file of any size therefore compiles a handful of programs. The batch is split
over the mesh's batch axes (data parallelism), the parameters placed as the loader put them.

Inputs: each text is encoded exactly as the classifier's fine-tune encoded it
(`LoadedModel.encoder` at the trained max_len: specials, truncation, padding on the right),
then cut to the bucket. The cut removes only positions past every row's last real token,
which masked attention and pooling never read, so a probability differs from the fine-tune's
own evaluation of the text by float rounding alone.

Many processes: each passes its own texts and supplies its rows of every global batch
(`make_array_from_process_local_data`), so all must run the same programs in step. A caller
that knows the largest count among them passes it as `num_batches` (a process with fewer texts
runs filler batches), and each batch's bucket is the largest any process needs (a small host
all-gather per batch).

Axis letters: B batch   T length   C classes
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llmopt_jax import distributed, sharding
from llmopt_jax.inference.loading import LoadedModel
from llmopt_jax.tasks.classification import classifier_logits

SHORTEST_BUCKET = 16


def bucket_lengths(max_len: int) -> tuple[int, ...]:
  """16, 32, 64, ... below `max_len`, then `max_len` itself."""
  lengths, n = [], SHORTEST_BUCKET
  while n < max_len:
    lengths.append(n)
    n *= 2
  return (*lengths, max_len)


class Classifier:
  """`predict(texts)` -> float32 [n, C] probabilities of `labels`, in the texts' order."""

  def __init__(self, model: LoadedModel, mesh: Mesh, rules: sharding.Rules, *,
               batch_size: int, max_len: int = 0):
    """`batch_size`: rows of a global batch (all processes together); `max_len`: tokens
    kept of a text, 0 = as the classifier was trained."""
    if model.kind != 'classifier':
      raise ValueError(f'{model.path}: a language model, not a classifier; classification '
                       f'needs a fine-tuned classifier (a finetune or distill run, a ptq/qat '
                       f'variant of one, or a Hugging Face *ForSequenceClassification)')
    self.max_len = max_len or model.max_len
    positions = model.config.max_positions  # a learned table's size; 0 (RoPE): no bound
    if positions and self.max_len > positions:
      raise ValueError(f'config.max_len={max_len}: the model reads at most {positions} '
                       f'positions')
    self.labels = model.labels
    self.lengths = bucket_lengths(self.max_len)
    self.rows_per_process = _rows_per_process(batch_size, mesh, rules)
    self._encode = model.encoder(self.max_len)
    self._params = model.params
    self._mesh, self._rules = mesh, rules
    batch_sharding = sharding.batch_sharding(mesh, rules)

    def probabilities(params: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
      with sharding.use(mesh, rules):  # activations placed by the rules while tracing
        logits = classifier_logits(nnx.merge(model.graphdef, params), batch)  # [B, C]
      return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    self._probabilities = jax.jit(
        probabilities, in_shardings=(jax.tree.map(lambda x: x.sharding, model.params),
                                     batch_sharding),
        out_shardings=batch_sharding)

  def num_batches(self, count: int) -> int:
    """Batches this process needs for `count` texts of its own."""
    return -(-count // self.rows_per_process)

  def predict(self, texts: Sequence[str], num_batches: int | None = None) -> np.ndarray:
    """float32 [len(texts), C]; runs `num_batches` batches (default: as many as needed)."""
    texts, rows = list(texts), self.rows_per_process
    num_batches = self.num_batches(len(texts)) if num_batches is None else num_batches
    if num_batches < self.num_batches(len(texts)):
      raise ValueError(f'{len(texts)} texts need {self.num_batches(len(texts))} batches of '
                       f'{rows}, not {num_batches}')
    out, running = [], None
    for i in range(num_batches):
      # Dispatch is asynchronous: the next batch is encoded while the devices run this one.
      launched = self._launch(texts[i * rows:(i + 1) * rows])
      if running is not None:
        out.append(_local_rows(running))
      running = launched
    if running is not None:
      out.append(_local_rows(running))
    return np.concatenate(out)[:len(texts)] if out else np.zeros((0, len(self.labels)),
                                                                  np.float32)

  def _launch(self, texts: list[str]) -> jax.Array:
    """Probabilities [batch_size, C] of one global batch (this process's `texts` in it)."""
    filled = texts + [''] * (self.rows_per_process - len(texts))
    ids, mask, types = self._encode(filled)  # [B, max_len] each, padded on the right
    mask = np.asarray(mask, bool)
    used = np.where(mask.any(axis=1), mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), 0)
    needed = distributed.max_over_processes(int(used.max()))
    length = next(n for n in self.lengths if n >= needed)
    batch = {'tokens': np.asarray(ids[:, :length], np.int32), 'padding_mask': mask[:, :length],
             'token_types': np.asarray(types[:, :length], np.int32)}
    return self._probabilities(self._params, sharding.shard_batch(batch, self._mesh,
                                                                  self._rules))


def _rows_per_process(batch_size: int, mesh: Mesh, rules: sharding.Rules) -> int:
  """This process's rows of a global batch, which must split over the batch's mesh axes."""
  axes = sharding.mesh_axes_of(sharding.logical_to_spec(('batch',), rules)[0])
  devices = math.prod(mesh.shape[a] for a in axes)
  processes = jax.process_count()
  if batch_size < 1 or batch_size % devices or batch_size % processes:
    raise ValueError(f'config.batch_size={batch_size} must be a positive multiple of the '
                     f'{devices} devices of the batch mesh axes {axes} and of the {processes} '
                     f'processes')
  return batch_size // processes


def _local_rows(array: jax.Array) -> np.ndarray:
  """The rows this process supplied, in its order: its shards sorted by their first row
  (how `make_array_from_process_local_data` laid them out), replicas dropped."""
  if array.is_fully_addressable:
    return np.asarray(array)
  shards = {shard.index[0].start or 0: shard.data for shard in array.addressable_shards}
  return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])

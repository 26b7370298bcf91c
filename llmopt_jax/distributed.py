"""Multi-process runs: joining the job, and the few host-side collectives the loop needs.

The same code runs as one process or as many (one per host on a TPU pod slice or a GPU
cluster, or several on one machine for testing). Every process runs the whole program on its
own slice of the data; JAX makes the arrays global, Orbax writes checkpoints from all of them,
and only process 0 logs.

Launch forms (see WORKSPACE.md):
  explicit:  main.py ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0
  detected:  main.py ... --distributed      (TPU pod slices, SLURM, Open MPI: JAX finds peers)
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils


def initialize(*, coordinator_address: str = '', num_processes: int = 1, process_id: int = 0,
               auto: bool = False) -> None:
  """Joins the multi-process job described by the flags; a no-op for a single process.

  Must run before anything touches a JAX backend.
  """
  if not coordinator_address and not auto:
    if num_processes != 1:
      raise ValueError(f'--num_processes={num_processes} needs --coordinator_address')
    return
  # CPU processes exchange collectives through gloo (the CPU client has no other transport);
  # the setting is ignored by GPU and TPU clients, so it is safe to set everywhere.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if auto:
    jax.distributed.initialize()
    return
  if not 0 <= process_id < num_processes:
    raise ValueError(f'--process_id={process_id} must lie in [0, --num_processes={num_processes})')
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id)


def allgather_json(value: Any) -> list[Any]:
  """`value` from every process, in process order (JSON-able values; small ones)."""
  if jax.process_count() == 1:
    return [value]
  encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(len(encoded)))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:len(encoded)] = encoded
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n])) for row, n in zip(gathered, lengths)]


def barrier(name: str) -> None:
  """Returns once every process has reached it (a no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def max_over_processes(value: int) -> int:
  if jax.process_count() == 1:
    return value
  return int(np.max(multihost_utils.process_allgather(np.int64(value))))


def data_shards(config: ml_collections.ConfigDict) -> list[tuple[int, int, int]]:
  """(shard index, rows per batch, shard count) of the data shards this process reads.

  The number of shards is a config field, not the number of processes, so the global batch
  (and with it the whole run) is the same on one process or on many.
  """
  processes, me = jax.process_count(), jax.process_index()
  count = config.data.num_shards or processes
  if count % processes:
    raise ValueError(f'config.data.num_shards={count} must be a multiple of the '
                     f'{processes} processes')
  if config.train.batch_size % count:
    raise ValueError(f'config.train.batch_size={config.train.batch_size} must be a multiple '
                     f'of the {count} data shards (config.data.num_shards)')
  rows, per_process = config.train.batch_size // count, count // processes
  return [(shard, rows, count) for shard in range(me * per_process, (me + 1) * per_process)]

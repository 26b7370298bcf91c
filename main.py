"""llmopt_jax entry point: one config, one workdir, the stage the config names.

  python main.py --config=configs/pretrain.py --workdir=runs/lm
  python main.py --config=configs/pretrain.py:tiny --config.optim.lr=1e-3 --workdir=/tmp/lm

Running again with the same workdir resumes from its last checkpoint.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from llmopt_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config, e.g. configs/pretrain.py or configs/pretrain.py:tiny.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.mark_flags_as_required(['config', 'workdir'])
# Multi-process runs (WORKSPACE.md, "Scaling out"); all three empty/default = one process.
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', '', 'host:port of process 0, for a multi-process run.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 1, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', 0, 'This process, in [0, num_processes).')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Join a multi-process run found by JAX (TPU pod slice, SLURM, MPI).')
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', os.path.join('~', '.cache', 'llmopt_jax', 'xla'),
    'Directory of the persistent XLA compilation cache shared by runs; empty = off '
    '(llmopt_jax/compile_cache.py).')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # JAX and Orbax are chatty at INFO
  import jax  # after flag parsing: typos fail before JAX starts

  from llmopt_jax import compile_cache, distributed, stages
  from llmopt_jax.train.loop import NonFiniteError

  cli.quiet_library_tracebacks()

  def run() -> None:
    distributed.initialize(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value, auto=_DISTRIBUTED.value)
    # Multi-process runs (CPU collectives over gloo) compile fresh unless a cache is asked for.
    if jax.process_count() == 1 or flags.FLAGS['compilation_cache'].present:
      compile_cache.enable(_COMPILATION_CACHE.value)
    stages.run(_CONFIG.value, _WORKDIR.value)
  cli.run_reporting_errors(run, expected=(ValueError, OSError, NonFiniteError))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

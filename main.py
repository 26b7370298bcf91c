"""llmopt_jax entry point: one config, one workdir, the stage the config names.

  python main.py --config=configs/pretrain.py --workdir=runs/lm
  python main.py --config=configs/pretrain.py:tiny --config.optim.lr=1e-3 --workdir=/tmp/lm

Running again with the same workdir resumes from its last checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from llmopt_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config, e.g. configs/pretrain.py or configs/pretrain.py:tiny.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # JAX and Orbax are chatty at INFO
  from llmopt_jax import stages  # after flag parsing: a typo fails before JAX starts
  from llmopt_jax.train.loop import NonFiniteError
  cli.run_reporting_errors(
      lambda: stages.run(_CONFIG.value, _WORKDIR.value),
      expected=(ValueError, OSError, NonFiniteError))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

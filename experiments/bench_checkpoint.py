"""What checksumming costs a checkpoint: the default fine-tune's state (MiniLM-L6 + AdamW).

  python experiments/bench_checkpoint.py
  python experiments/bench_checkpoint.py --rounds=5 --mesh=fsdp

Builds the train state `configs/finetune.py` trains (all-MiniLM-L6-v2 with a Banking77 head,
AdamW moments: 3 x 22.7M float32 arrays) on the config's mesh, then, in the same run and in
turns: a full save (Orbax, the project's `Checkpoints`, waited for until committed) and its
restore with verification, against the checksum computation alone (`checksum.checksums`) on
the same state. Prints the median of `--rounds` for each, and the checksum's share of a save
and of a restore.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the path fix above)
from absl import app, flags  # noqa: E402

from llmopt_jax import configlib  # noqa: E402
from llmopt_jax.tasks import classification  # noqa: E402
from llmopt_jax.train import checksum, setup as setup_lib, state as state_lib  # noqa: E402
from llmopt_jax.train.checkpoint import Checkpoints  # noqa: E402
from llmopt_jax.train.config import TrainConfig  # noqa: E402

_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds of save/restore/checksum, median kept.')
_MESH = flags.DEFINE_string('mesh', 'data', 'Mesh preset of configs/finetune.py.')


def _time(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main(argv) -> None:
  del argv
  config = configlib.sibling('finetune', mesh=_MESH.value)
  built = classification.fine_tuning(config, None)
  setup = setup_lib.Setup.of(TrainConfig.from_config(config), built.task)
  state = state_lib.initialize_from(built.task.pretrained(setup.mesh, setup.rules), setup.tx,
                                    setup.shardings)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  checksum.checksums(state)  # compiled once, outside the timings
  saves, restores, sums = [], [], []
  with tempfile.TemporaryDirectory() as directory:
    checkpoints = Checkpoints(directory, keep_last=1, keep_best=0, best_metric='eval/loss',
                              best_mode='min')
    for step in range(1, _ROUNDS.value + 1):
      saves.append(_time(lambda: (checkpoints.save(step, state, {}), checkpoints.wait())))
      restores.append(_time(lambda: jax.block_until_ready(
          checkpoints.restore(step, setup.abstract)[0])))
      sums.append(_time(lambda: checksum.checksums(state)))
    checkpoints.close()
  save, restore, one_sum = (statistics.median(t) for t in (saves, restores, sums))
  print(f'state: {nbytes / 2**20:.1f} MiB on mesh {dict(setup.mesh.shape)}; median of '
        f'{_ROUNDS.value} rounds')
  print(f'save (with checksums, committed) {save:.3f} s; restore (with verification) '
        f'{restore:.3f} s; checksums alone {one_sum:.3f} s')
  print(f'checksum share: {100 * one_sum / save:.1f}% of a save, '
        f'{100 * one_sum / restore:.1f}% of a restore')


if __name__ == '__main__':
  jax.config.update('jax_platforms', os.environ.get('JAX_PLATFORMS', 'cpu'))
  app.run(main)

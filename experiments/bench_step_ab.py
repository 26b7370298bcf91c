"""A train step with and without this project's step optimizations, alternated in one process.

  python experiments/bench_step_ab.py --workloads=gpt2,finetune     # ~8 min on 2 CPU cores
  python experiments/bench_step_ab.py --workloads=finetune --rounds=6 --steps=8
  python experiments/bench_step_ab.py --small --rounds=1 --steps=1     # checks that it runs

Builds one of bench_vs_torch.py's steps twice: once as the code stands, and once with the
reference formulations put back for the duration of its tracing:
  - `models.matmul.einsum` replaced by `jnp.einsum` (JAX's autodiff of the projections, whose
    weight gradient XLA:CPU transposes; see models/matmul.py);
  - `models.dropout.keep_mask` replaced by `jax.random.bernoulli` (32 random bits a decision,
    as flax's nnx.Dropout draws them).
The two compiled steps then run in alternated turns, `--rounds` times, each turn `--warmup`
untimed steps and `--steps` timed ones; each side's median turn is printed with the speed-up.
The order alternates between rounds, so neither side always runs first.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402  (after the path fix above)
import jax.numpy as jnp  # noqa: E402
from absl import app  # noqa: E402

import bench_vs_torch  # noqa: E402
from llmopt_jax.models import dropout, matmul  # noqa: E402

# The flags are bench_vs_torch.py's (imported above): --workloads, --rounds, --steps, --warmup,
# --small; the defaults there are 3 rounds of 10 timed steps.
_WORKLOADS, _ROUNDS, _STEPS, _WARMUP, _SMALL = (
    bench_vs_torch._WORKLOADS, bench_vs_torch._ROUNDS, bench_vs_torch._STEPS,
    bench_vs_torch._WARMUP, bench_vs_torch._SMALL)

BUILDERS = {'gpt2': bench_vs_torch.gpt2, 'finetune': bench_vs_torch.finetune,
            'distill': bench_vs_torch.distill}


def _plain_einsum(spec, x, w, preferred_element_type=None):
  return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)


def _bernoulli_mask(key, shape, rate):
  return jax.random.bernoulli(key, 1.0 - rate, shape)


@contextlib.contextmanager
def reference_formulations():
  """JAX's default einsum gradient and 32-bit dropout masks, while a step is traced."""
  saved = matmul.einsum, dropout.keep_mask
  matmul.einsum, dropout.keep_mask = _plain_einsum, _bernoulli_mask
  try:
    yield
  finally:
    matmul.einsum, dropout.keep_mask = saved


def turn(run, steps: int) -> float:
  run(_WARMUP.value)
  start = time.perf_counter()
  run(steps)
  return (time.perf_counter() - start) / steps


def main(argv: list[str]) -> None:
  del argv
  for name in _WORKLOADS.value:
    ours = BUILDERS[name](_SMALL.value)
    with reference_formulations():  # `_Ours` compiles in its constructor, inside the context
      reference = BUILDERS[name](_SMALL.value)
    times = {'reference': [], 'ours': []}
    for i in range(_ROUNDS.value):
      order = (('reference', reference), ('ours', ours))
      for side, workload in order if i % 2 == 0 else order[::-1]:
        times[side].append(turn(workload.ours, _STEPS.value))
      print(f'  {name} round {i + 1}: reference {times["reference"][-1] * 1e3:.0f} ms, ours '
            f'{times["ours"][-1] * 1e3:.0f} ms', flush=True)
    ref, new = statistics.median(times['reference']), statistics.median(times['ours'])
    print(f'{ours.shape}: reference {ref * 1e3:.0f} ms/step, ours {new * 1e3:.0f} ms/step, '
          f'speed-up {ref / new:.3f}x ({ours.tokens_per_step / new:,.0f} tokens/s)', flush=True)


if __name__ == '__main__':
  app.run(main)

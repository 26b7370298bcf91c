"""The projections' backward pass: `models/matmul.py` against JAX's autodiff of the einsum.

  python experiments/bench_matmul.py                  # ~1 min on 2 CPU cores
  python experiments/bench_matmul.py --rounds=5 --out=experiments/results/bench_matmul.md

For each projection shape of the two benchmark steps (the GPT-2 shape L6 D384 T256 B16
V8192 and the MiniLM fine-tune, 32 x 32 tokens): the forward and backward pass of one layer,
y = gelu(x @ w) summed, differentiated with respect to x and w, compiled both ways and timed in
alternated turns (median of `--rounds`, each the best of 5 calls). Printed: milliseconds of
each, the ratio, and the copies and transposes in each compiled program (the operations the
written-out backward pass exists to remove).
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the path fix above)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from llmopt_jax import compare  # noqa: E402
from llmopt_jax.models import matmul  # noqa: E402

_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Alternated turns per side.', lower_bound=1)
_OUT = flags.DEFINE_string('out', '', 'Also write the table (markdown) here.')

# (what, einsum spec, x shape, w shape)
SHAPES = (
    ('GPT-2 MLP up', 'BTD,DF->BTF', (16, 256, 384), (384, 1536)),
    ('GPT-2 MLP down', 'BTF,FD->BTD', (16, 256, 1536), (1536, 384)),
    ('GPT-2 q/k/v', 'BTD,DNH->BTNH', (16, 256, 384), (384, 6, 64)),
    ('GPT-2 tied LM head', 'BTD,VD->BTV', (16, 256, 384), (8192, 384)),
    ('MiniLM MLP up', 'BTD,DF->BTF', (32, 32, 384), (384, 1536)),
    ('MiniLM attention out', 'BTNH,NHD->BTD', (32, 32, 12, 32), (12, 32, 384)),
)


def layer_grad(project, spec: str):
  def loss(x, w):
    return jnp.sum(jax.nn.gelu(project(spec, x, w)))
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def moved_ops(compiled_text: str) -> int:
  entry = compiled_text[compiled_text.index('ENTRY'):]
  return sum(any(word in name or word in op for word in ('copy', 'transpose'))
             for name, op in re.findall(r'%(\S+) = \S+ ([\w-]+)\(', entry))


def best_of(fn, args, calls: int = 5) -> float:
  best = float('inf')
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def measure(spec: str, x_shape, w_shape) -> tuple[float, float, int, int]:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(w_shape) * 0.05, jnp.float32)
  sides = [layer_grad(jnp.einsum, spec), layer_grad(matmul.einsum, spec)]
  moved = [moved_ops(f.lower(x, w).compile().as_text()) for f in sides]
  times = [[], []]
  for _ in range(_ROUNDS.value):
    for side, f in enumerate(sides):
      jax.block_until_ready(f(x, w))
      times[side].append(best_of(f, (x, w)))
  autodiff, ours = (statistics.median(t) for t in times)
  return autodiff, ours, *moved


def main(argv: list[str]) -> None:
  del argv
  rows = []
  for what, spec, x_shape, w_shape in SHAPES:
    autodiff, ours, moved_autodiff, moved_ours = measure(spec, x_shape, w_shape)
    rows.append([what, f'`{spec}`', f'{autodiff * 1e3:.1f}', f'{ours * 1e3:.1f}',
                 f'**{autodiff / ours:.2f}x**', f'{moved_autodiff} / {moved_ours}'])
    print(' | '.join(rows[-1]), flush=True)
  table = compare.markdown_table(
      ['layer', 'einsum', 'autodiff ms', 'matmul.py ms', 'speed-up',
       'copies+transposes (autodiff / ours)'], rows)
  report = (f'{table}\n\nForward + backward of gelu(x @ w), float32, median of '
            f'{_ROUNDS.value} alternated turns of the best of 5 calls. Command: '
            f'`python {" ".join(sys.argv)}`; {datetime.datetime.now():%Y-%m-%d %H:%M}, '
            f'{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__}.\n')
  print(report)
  if _OUT.value:
    with open(_OUT.value, 'w', encoding='utf-8') as f:
      f.write(report)


if __name__ == '__main__':
  app.run(main)

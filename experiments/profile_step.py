"""Where a train step's time goes on XLA:CPU: per-op times from a profiler trace, joined to the
optimized HLO, grouped by what the op does.

  python experiments/profile_step.py --steps=3                # the GPT-2 shape, ~1 min
  python experiments/profile_step.py --workload=finetune --out=/tmp/profile.md
  python experiments/profile_step.py --small --steps=1        # checks that it runs

The step is `bench_vs_torch.py`'s (the loop's own compiled train step on a fixed batch):
`--steps` steps are timed, then run again under `jax.profiler.trace`, after two untimed ones. XLA:CPU records one
event per executed op (a fusion, a YNNPACK/Eigen matmul, a copy); each is looked up in the
executable's HLO text for its shape and the `op_name` JAX wrote into its metadata, which says
which part of the program it came from: `jvp(...)` the forward pass, `transpose(jvp(...))` the
backward pass, neither the optimizer's update. Matmuls are also given their FLOPs (from the
dot's shapes in the fused computation) and so their achieved rate, per einsum.

The times of one process on a shared machine are only as steady as the machine: the shares
are what to read, and a busy machine blurs them less than it does absolute figures.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the path fix above)
from absl import app, flags  # noqa: E402

# Its flags (--steps, --small, --out) are this script's too.

import bench_vs_torch  # noqa: E402  (experiments/, beside this file)
from llmopt_jax import cli, compare  # noqa: E402

_WORKLOAD = flags.DEFINE_enum('workload', 'gpt2', ['gpt2', 'finetune', 'distill'],
                              "Which of bench_vs_torch.py's workloads.")
_TOP = flags.DEFINE_integer('top', 12, 'Einsums listed in the matmul table.')
# --steps (profiled steps), --small and --out are bench_vs_torch.py's flags.

# The profiler's own events (host-side Python frames, the executor, thread-pool waits):
# they span the ops and are not ops.
_NOT_OPS = ('$', 'Thunk', 'Slinky', 'PjitFunction', 'CommonPjRt', 'ParseArguments')


def op_times(trace_dir: str, steps: int) -> dict[str, float]:
  """Seconds per step of each executed HLO op (by instruction name) in a perfetto trace."""
  path = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)[-1]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  times: dict[str, float] = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and 'dur' in e and not e['name'].startswith(_NOT_OPS):
      times[e['name']] += e['dur'] * 1e-6 / steps
  return times


def instructions(hlo: str) -> dict[str, str]:
  """Instruction name -> its line, for the executable's top-level and fused instructions."""
  found = {}
  for line in hlo.splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = ', line)
    if m:
      found.setdefault(m.group(1), line)
  return found


def computations(hlo: str) -> dict[str, str]:
  """Computation name -> its body (fusions call these)."""
  return {m.group(1): m.group(2)
          for m in re.finditer(r'^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}', hlo, re.DOTALL | re.MULTILINE)}


def _dims(shape: str) -> list[int]:
  m = re.match(r'\w+\[([\d,]*)\]', shape)
  return [int(d) for d in m.group(1).split(',') if d] if m else []


def dot_flops(dots: str, context: str) -> float:
  """FLOPs of the dot instructions among `dots` (lines): 2 x output elements x contracted
  size, their operands' shapes looked up in `context` (the fused body, or the whole HLO)."""
  flops = 0.0
  for line in dots.splitlines():
    if ' dot(' not in line:
      continue
    out = re.search(r'= (\w+\[[\d,]*\])', line).group(1)
    lhs_name = re.search(r'dot\(([^,)]*)', line).group(1).strip().lstrip('%')
    lhs = re.search(r'%?' + re.escape(lhs_name) + r' = (\w+\[[\d,]*\])', context)
    contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', line)
    if lhs and contracting:
      shape = _dims(lhs.group(1))
      k = math.prod(shape[int(i)] for i in contracting.group(1).split(',') if i)
      flops += 2.0 * math.prod(_dims(out)) * k
  return flops


def op_name(line: str) -> str:
  m = re.search(r'op_name="([^"]+)"', line)
  return m.group(1).removeprefix('jit(wrapped)/') if m else ''


def category(name: str, line: str) -> str:
  """What an op does, from its fusion kind and the op_name JAX gave it."""
  op = op_name(line)
  backward = op.startswith('transpose(jvp')
  if 'dot_general' in op or (' dot(' in line and 'reduce' not in op):
    return 'matmuls'
  if re.search(r'bernoulli|uniform|threefry|random_bits|dropout', op):
    return 'dropout (random bits, mask)'
  if 'copy' in name or 'transpose' in name:
    return 'copies and transposes' + (' (backward)' if backward else '')
  if re.search(r'reduce_(sum|max)|argmax|reduce\b', op) or 'reduce' in name:
    return 'reductions (norms, softmax, bias gradients)'
  if 'jvp' not in op:
    return 'optimizer update'
  return 'elementwise, backward' if backward else 'elementwise, forward'


def profile(workload: bench_vs_torch.Workload, steps: int) -> tuple[float, str, dict]:
  """(seconds per step, optimized HLO, op -> seconds per step) of `workload`'s step."""
  step = workload.ours
  step(2)
  start = time.perf_counter()
  step(steps)
  seconds = (time.perf_counter() - start) / steps
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      step(steps)
    times = op_times(trace_dir, steps)
  return seconds, step.step.step.as_text(), times


def render(workload: bench_vs_torch.Workload, seconds: float, hlo: str,
           times: dict[str, float], top: int) -> str:
  lines, bodies = instructions(hlo), computations(hlo)
  total = sum(times.values())
  by_category: dict[str, float] = collections.Counter()
  by_einsum: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
  for name, t in times.items():
    line = lines.get(name, '')
    kind = category(name, line)
    by_category[kind] += t
    if kind == 'matmuls':
      called = re.search(r'calls=%?([\w.\-]+)', line)
      body = bodies.get(called.group(1), '') if called else ''
      entry = by_einsum[op_name(line) or name]
      entry[0] += t
      entry[1] += dot_flops(body, body) if called else dot_flops(line, hlo)
      entry[2] += 1
  model_flops = workload.tokens_per_step * workload.flops_per_token
  matmul_time = by_category['matmuls']
  matmul_flops = sum(f for _, f, _ in by_einsum.values())
  head = (f'`{workload.shape}`: {seconds * 1e3:.0f} ms per step, '
          f'{workload.tokens_per_step / seconds:,.0f} tokens/s, '
          f'{model_flops / seconds / 1e9:.1f} GFLOP/s of model FLOPs. Profiled ops add up to '
          f'{total * 1e3:.0f} ms per step; matmuls run {matmul_flops / 1e9:.1f} GFLOP at '
          f'{matmul_flops / max(matmul_time, 1e-9) / 1e9:.1f} GFLOP/s.\n\n')
  shares = compare.markdown_table(
      ['what the ops do', 'ms per step', 'share'],
      [[kind, f'{t * 1e3:.1f}', f'{t / total:.1%}'] for kind, t in by_category.most_common()])
  einsums = compare.markdown_table(
      ['einsum (op_name)', 'ops', 'ms per step', 'GFLOP', 'GFLOP/s'],
      [[f'`{key[:80]}`', n, f'{t * 1e3:.1f}', f'{f / 1e9:.2f}', f'{f / max(t, 1e-9) / 1e9:.1f}']
       for key, (t, f, n) in sorted(by_einsum.items(), key=lambda kv: -kv[1][0])[:top]])
  return head + shares + '\nThe largest matmuls (forward `jvp`, backward `transpose(jvp)`):\n\n' + einsums


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  jax.config.update('jax_platforms', 'cpu')
  builders = {'gpt2': bench_vs_torch.gpt2, 'finetune': bench_vs_torch.finetune,
              'distill': bench_vs_torch.distill}
  workload = builders[_WORKLOAD.value](bench_vs_torch._SMALL.value)
  seconds, hlo, times = profile(workload, bench_vs_torch._STEPS.value)
  text = (f'# Where the {_WORKLOAD.value} train step spends its time (`profile_step.py`)\n\n'
          f'**Command.** `python {" ".join(sys.argv)}`. **Machine.** {bench_vs_torch.cpu()}; '
          f'load average {bench_vs_torch.load()}; jax {jax.__version__}.\n\n'
          + render(workload, seconds, hlo, times, _TOP.value))
  print(text)
  if bench_vs_torch._OUT.value:
    with open(bench_vs_torch._OUT.value, 'w') as f:
      f.write(text)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

"""Our train steps against the same models in Hugging Face transformers + PyTorch, in one run.

  python experiments/bench_vs_torch.py                            # ~10 min on 2 CPU cores
  python experiments/bench_vs_torch.py --workloads=gpt2 --rounds=5 --out=/tmp/bench.md
  python experiments/bench_vs_torch.py --small --rounds=1 --steps=2   # checks that it runs

Workloads (`--workloads`), each built from its config the way the main job builds it:
  gpt2      configs/pretrain.py with the GPT-2 shape L6 D384 H6 T256 B16 V8192 (`_GPT2`;
            the BPE vocabulary trained on tiny Shakespeare); torch: GPT2LMHeadModel of the same
            config, causal-LM cross entropy.
  finetune  configs/finetune.py: all-MiniLM-L6-v2 (shipped), mean pooling and a linear head
            on Banking77's 77 classes, batch 32 x 32 tokens; torch: BertModel, the same
            pooling and head, cross entropy.
  distill   configs/distill.py in online mode: the 6-layer MiniLM teacher's forward inside
            the 2-layer student's train step, KD loss with the configured alpha and
            temperature; torch: the same two models, the teacher under no_grad.
Both sides run float32, AdamW with the config's lr, betas, eps and weight decay, global-norm
clipping and dropout as configured (`torch_reference.py` says how the torch side is built).
Batches are fixed random token ids (every position real) placed before the clocks start: the
figures are the steps, not the input pipelines. Tokens/s counts every input token of a step.

The clock. The two programs alternate in one process, ours then torch, `--rounds` times; each
turn runs `--warmup` untimed steps and `--steps` timed ones, and each side's median turn is
reported, so load that comes and goes on a shared machine falls on both. Both run on the same
N cores (`--threads`; default every core this process may use: os.cpu_count() on a machine
without a CPU mask). torch gets torch.set_num_threads(N). XLA:CPU has no thread-count flag: it
sizes its intra-op thread pool from the process's CPU affinity, so the process is pinned to N
cores before JAX starts, and N = 1 adds XLA_FLAGS=--xla_cpu_multi_thread_eigen=false.
Run it on a quiet machine: when other jobs hold the cores, threads that wait for each other
at every kernel (torch's OpenMP above all) lose whole time slices, and the ratio means nothing.

MFU = tokens/s x model FLOPs per token (`models/stats.py`: training FLOPs of the trained model,
plus the teacher's forward for distill) / the float32 matmul peak measured in the same run on
the same cores (`perf.measure_matmul_peak`). Goals (issue 19): ours / torch >= 1.3 on each
workload, and the GPT-2 step at >= 70% of that peak.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

# Run as a script, Python puts experiments/ on the path, not the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the path fix above)
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import nnx  # noqa: E402

import torch_reference  # noqa: E402  (experiments/, beside this file)
from llmopt_jax import cli, compare, configlib, lora, perf, sharding  # noqa: E402
from llmopt_jax.distill import student_task  # noqa: E402
from llmopt_jax.hf.load import build  # noqa: E402
from llmopt_jax.models import stats  # noqa: E402
from llmopt_jax.tasks import classification, finished, lm, problem as problem_lib  # noqa: E402
from llmopt_jax.train import benchmark as benchmark_lib  # noqa: E402
from llmopt_jax.train.config import TrainConfig  # noqa: E402
from llmopt_jax.train.task import Task  # noqa: E402

WORKLOADS = ('gpt2', 'finetune', 'distill')
_WORKLOADS = flags.DEFINE_list('workloads', list(WORKLOADS), f'Any of {WORKLOADS}.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Turns of each side, alternated.', lower_bound=1)
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per turn.', lower_bound=1)
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps before each turn.', lower_bound=0)
_THREADS = flags.DEFINE_integer(
    'threads', 0, 'Cores (and threads) for both sides; 0 = all this process may use.',
    lower_bound=0)
_SMALL = flags.DEFINE_boolean('small', False, 'Reduced shapes, to check the script runs.')
_OUT = flags.DEFINE_string('out', '', 'Also write the report (markdown) to this file.')

# configs/pretrain.py overrides giving GPT-2's architecture at L6 D384 H6 T256 B16 V8192.
_GPT2 = {'model.family': 'gpt2', 'model.num_layers': 6, 'model.embed_dim': 384,
         'model.num_heads': 6, 'model.num_kv_heads': 6, 'model.head_dim': 64,
         'model.mlp_dim': 1536, 'model.max_positions': 256, 'data.seq_len': 256,
         'data.vocab_size': 8192, 'train.batch_size': 16}
_GPT2_SMALL = {**_GPT2, 'model.num_layers': 2, 'model.embed_dim': 64, 'model.num_heads': 2,
               'model.num_kv_heads': 2, 'model.head_dim': 32, 'model.mlp_dim': 256,
               'model.max_positions': 32, 'data.seq_len': 32, 'data.vocab_size': 512,
               'train.batch_size': 4}
_CLASSIFIER_SMALL = {'train.batch_size': 4, 'data.max_len': 16}

StepRunner = Callable[[int], None]  # runs n train steps, returns when they are done


@dataclasses.dataclass(frozen=True)
class Workload:
  name: str
  shape: str              # what the table's row says was run
  tokens_per_step: int
  flops_per_token: float  # model FLOPs of a step per token, for MFU
  ours: StepRunner
  theirs: StepRunner


class _Ours:
  """Our compiled train step on one placed batch; it donates the state, so the latest is kept."""

  def __init__(self, config: ml_collections.ConfigDict, task: Task, batch: dict):
    self.step, self.state = benchmark_lib.compile_train_step(
        TrainConfig.from_config(config), task, batch)
    self.batch = self.step.place(batch)

  def __call__(self, n: int) -> None:
    self.state = benchmark_lib.run(self.step, self.state, [self.batch] * n)


def _random_batch(template: dict[str, np.ndarray], vocab: int, num_labels: int = 0
                  ) -> dict[str, np.ndarray]:
  """Fixed random ids with the keys, shapes and dtypes of a real batch of the pipeline, every
  position real; a key not known here is an error (the pipeline changed: update this)."""
  rng = np.random.default_rng(0)

  def fill(key: str, real: np.ndarray) -> np.ndarray:
    if key in ('inputs', 'targets', 'tokens'):
      return rng.integers(0, vocab, real.shape).astype(real.dtype)
    if key == 'labels':
      return rng.integers(0, num_labels, real.shape).astype(real.dtype)
    if key in ('weights', 'padding_mask'):
      return np.ones_like(real)
    if key == 'token_types':
      return np.zeros_like(real)
    if key == 'index':  # the examples' positions in the split, for side data (a teacher cache)
      return real
    raise ValueError(f'bench_vs_torch: the batch has a key {key!r} it cannot fill')
  return {key: fill(key, real) for key, real in template.items()}


def _config(name: str, overrides: dict) -> ml_collections.ConfigDict:
  config = configlib.sibling(name)
  config.update_from_flattened_dict(overrides)
  return config


def gpt2(small: bool) -> Workload:
  config = _config('pretrain', _GPT2_SMALL if small else _GPT2)
  with tempfile.TemporaryDirectory() as workdir:  # the BPE tokenizer is written here
    built = lm.pretraining(config, workdir)
    template = next(built.task.train_data)
  model, (b, t) = built.card.model, template['inputs'].shape
  batch = _random_batch(template, model.vocab_size)
  return Workload(
      'gpt2', f'GPT-2 L{model.num_layers} D{model.embed_dim} H{model.num_heads} T{t} B{b} '
      f'V{model.vocab_size} train step', b * t, stats.flops_per_token(model, t),
      _Ours(config, built.task, batch),
      torch_reference.lm_steps(model, TrainConfig.from_config(config).optim, batch))


def finetune(small: bool) -> Workload:
  config = _config('finetune', _CLASSIFIER_SMALL if small else {})
  built = classification.fine_tuning(config, lora.from_config(config.peft))
  model, labels = built.card.model, built.head.num_labels
  if built.head.pooling != 'mean':
    raise ValueError('bench_vs_torch: the torch classifier pools the mean, as configs/finetune.py')
  batch = _random_batch(next(built.task.train_data), model.vocab_size, labels)
  b, t = batch['tokens'].shape
  return Workload(
      'finetune', f'MiniLM-L{model.num_layers} {config.data.name} fine-tune step '
      f'({labels} classes), B{b} x T{t}', b * t, stats.flops_per_token(model, t),
      _Ours(config, built.task, batch),
      torch_reference.classifier_steps(model, labels, TrainConfig.from_config(config).optim,
                                       batch, config.head.label_smoothing))


def _teacher(config: ml_collections.ConfigDict,
             built: classification.ClassificationTask) -> finished.FinishedModel:
  """The pretrained model with the fine-tune's fresh head standing in for a fine-tuned
  teacher (weights do not change the time), like `bench_distill.py`'s."""
  mesh, rules = sharding.from_config(config.mesh)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(built.card.model, built.head,
                                                       nnx.Rngs(0))))
  return finished.FinishedModel('', built.card, config, 0, graphdef,
                                built.task.pretrained(mesh, rules))


def distill(small: bool) -> Workload:
  config = _config('distill', {'distill.mode': 'online', **(_CLASSIFIER_SMALL if small else {})})
  built = classification.fine_tuning(config, None)
  teacher = _teacher(config, built)
  task = student_task.student_task(config, '', teacher, problem_lib.make(config, teacher),
                                   distilled=True)
  student = student_task.student_card(config, teacher).model
  labels = built.head.num_labels
  batch = _random_batch(next(task.train_data), student.vocab_size, labels)
  b, t = batch['tokens'].shape
  flops = (stats.flops_per_token(student, t)
           + stats.forward_flops_per_token(teacher.card.model, t))
  d = config.distill
  return Workload(
      'distill', f'distillation step: MiniLM-L{teacher.card.model.num_layers} teacher forward '
      f'+ L{student.num_layers} student, T={d.temperature:g}, alpha={d.alpha:g}, B{b} x T{t}',
      b * t, flops, _Ours(config, task, batch),
      torch_reference.distill_steps(teacher.card.model, student, labels,
                                    TrainConfig.from_config(config).optim, batch,
                                    alpha=d.alpha, temperature=d.temperature))


def measure(w: Workload, rounds: int, warmup: int, steps: int) -> tuple[float, float]:
  """(ours, torch) median seconds per step over `rounds` turns each, taken alternately."""
  ours, theirs = [], []
  for i in range(rounds):
    for run, samples in ((w.ours, ours), (w.theirs, theirs)):
      run(warmup)
      start = time.perf_counter()
      run(steps)
      samples.append((time.perf_counter() - start) / steps)
    print(f'  {w.name} round {i + 1}/{rounds}: ours {ours[-1] * 1e3:.1f} ms, torch '
          f'{theirs[-1] * 1e3:.1f} ms per step', flush=True)
  return statistics.median(ours), statistics.median(theirs)


def table(rows: list[tuple[Workload, float, float]], peak: float) -> str:
  """One markdown row per workload: tokens/s of each side, their ratio, MFU of each."""
  def mfu(w: Workload, seconds: float) -> str:
    return f'{w.tokens_per_step / seconds * w.flops_per_token / peak:.1%}'
  return compare.markdown_table(
      ['workload', 'ours tokens/s', 'torch tokens/s', 'ratio ours/torch', 'ours MFU',
       'torch MFU'],
      [[w.shape, f'{w.tokens_per_step / ours:,.0f}', f'{w.tokens_per_step / theirs:,.0f}',
        f'**{theirs / ours:.2f}x**', mfu(w, ours), mfu(w, theirs)]
       for w, ours, theirs in rows])


def pin_threads(requested: int) -> tuple[int, list[int]]:
  """Confines this process to `requested` of the cores it may use (0: all of them) and sizes
  both runtimes' thread pools to match; must run before JAX starts its CPU runtime."""
  allowed = sorted(os.sched_getaffinity(0))
  n = requested or len(allowed)
  if n > len(allowed):
    cli.fail(f'--threads={requested}: this process may use {len(allowed)} cores')
  cores = allowed[:n]
  os.sched_setaffinity(0, cores)  # XLA:CPU sizes its intra-op pool from this
  if n == 1:
    os.environ['XLA_FLAGS'] = ' '.join(
        [os.environ.get('XLA_FLAGS', ''), '--xla_cpu_multi_thread_eigen=false']).strip()
  torch_reference.set_threads(n)
  return n, cores


def cpu() -> str:
  with open('/proc/cpuinfo') as f:
    name = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')),
                'unknown CPU')
  return f'{name}, {os.cpu_count()} cores'


def load() -> str:
  """The load average: a busy machine slows both sides, and torch's threads the most."""
  return ', '.join(f'{x:.2f}' for x in os.getloadavg())


def report(body: str, started: str, load_at_start: str) -> str:
  """The markdown file of `--out`, in the layout of experiments/results/*.md."""
  return (f'# Train steps against Hugging Face transformers + PyTorch (`bench_vs_torch.py`)\n\n'
          f'**What was measured.** Tokens/s of our train step and of the same model in '
          f'transformers + torch, alternated in one run (see the script\'s docstring), and '
          f'MFU against the matmul peak measured in the run.\n\n'
          f'**Command.**\n\n    python {" ".join(sys.argv)}\n\n**Date.** {started}.\n\n'
          f'**Machine.** {cpu()}, no GPU (both sides on the CPU); load average '
          f'{load_at_start} at the start, {load()} at the end (1, 5, 15 min).\n\n{body}')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if unknown := sorted(set(_WORKLOADS.value) - set(WORKLOADS)):
    cli.fail(f'--workloads: unknown {unknown}; choose from {list(WORKLOADS)}')
  started, load_at_start = datetime.datetime.now().isoformat(timespec='seconds'), load()
  jax.config.update('jax_platforms', 'cpu')  # the comparison is on the CPU, both sides
  threads, cores = pin_threads(_THREADS.value)
  print(f'{started}: {cpu()}, load average {load_at_start}; {threads} thread(s) on cores '
        f'{cores}', flush=True)
  builders = {'gpt2': gpt2, 'finetune': finetune, 'distill': distill}
  workloads = [builders[name](_SMALL.value) for name in _WORKLOADS.value]
  peak = perf.measure_matmul_peak()
  rows = [(w, *measure(w, _ROUNDS.value, _WARMUP.value, _STEPS.value)) for w in workloads]
  body = (f'Both sides float32 on {threads} thread(s) (cores {cores}); jax {jax.__version__} '
          f'(XLA:CPU) against {torch_reference.versions()}; median of {_ROUNDS.value} '
          f'alternated turns of {_STEPS.value} steps (after {_WARMUP.value} untimed) per side. '
          f'MFU against a float32 matmul peak of {perf.si(peak, "FLOP/s")} measured in this '
          f'run. Goals: ratio >= 1.3x on each workload; the GPT-2 step at >= 70% MFU.\n\n'
          + table(rows, peak))
  print(body)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      f.write(report(body, started, load_at_start))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

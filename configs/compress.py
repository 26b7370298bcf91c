"""Compress a trained model in one run: structured pruning, distillation from the unpruned
model, then int8 / int4 quantization of the result, each step scored in one table.

  python main.py --config=configs/compress.py --workdir=runs/compress  # trains the fine-tune first
  python main.py --config=configs/compress.py:source=runs/distill/teacher --workdir=runs/compress
  python main.py --config=configs/compress.py:tiny --workdir=/tmp/compress           # a minute
  python main.py --config=configs/compress.py:task=lm,source=runs/lm --workdir=runs/compress_lm
  python main.py --config=configs/compress.py:source=runs/distill/teacher \
      --config.prune.heads_fraction=0.5 --config.prune.neurons_fraction=0.75 \
      --config.train.num_steps=1000 --config.quant_variants="('int8',)" --workdir=runs/c2

The chain (the Minitron / Sheared-LLaMA recipe, then PTQ): the source's least important
attention heads and MLP neurons (by weight norm) sliced away -> the smaller model distilled
from the source's logits in <workdir>/pruned-distilled/ -> each recipe of `quant_variants`
applied to the distilled model, written as integers to <workdir>/pruned-distilled-<recipe>/.
Rows: dense, pruned, pruned+distilled, pruned+distilled+<recipe>; a rerun trains nothing again.

Arguments (after the colon): those of configs/ptq.py (tiny, task, source, mesh).
Fields: `prune.heads_fraction` / `neurons_fraction` (llmopt_jax/prune/config.py); the
distillation's `train`, `optim`, `distill` (logits, online) and `recovery_distill` fields are
configs/prune.py's recovery fields; `quant` is configs/ptq.py's recipe section
(llmopt_jax/quant/config.py), each entry of `quant_variants` setting bits and granularity as
ptq's `variants` do.
"""

import ml_collections

from llmopt_jax import configlib
from llmopt_jax.quant import config as quant_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configlib.parse_arg(arg, tiny=False, task='banking77', source='', mesh='data')
  lm = arg.task == 'lm'
  # The source, calibration, data, evaluation and the recovery run's training fields are the
  # prune stage's, so a compress run and a prune run of the same source compare directly.
  config = configlib.sibling('prune', tiny=arg.tiny, task=arg.task, source=arg.source,
                             mesh=arg.mesh)
  config.stage = 'compress'
  for field in ('variants', 'sparsities', 'recover'):  # the prune stage's recipe list
    del config[field]
  # Structured pruning is the one kind that makes the model faster (a smaller dense model),
  # and the only one its quantized integers can be stacked on without a sparse format.
  config.prune = ml_collections.ConfigDict({
      'heads_fraction': 0.25,   # share of each block's attention heads (kv groups) removed
      'neurons_fraction': 0.5,  # share of each block's MLP neurons removed
  })
  # Distillation from the dense source's logits (`distill` fields, online): without it the
  # step is a label-only fine-tune and its row reads "pruned+fine-tuned".
  config.recovery_distill = True

  config.quant = quant_config.section()
  config.quant_variants = ('int8', 'int4-group')
  if arg.tiny and lm:
    config.quant.group_size = 32  # the tiny decoder's MLP, 192 wide, is sliced to 96
  return config

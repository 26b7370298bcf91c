"""Pruning: magnitude, random, Taylor, Wanda and SparseGPT at several sparsities and as 2:4,
one-shot from a trained model, with recovery fine-tunes, each variant written compressed and
scored beside the dense model.

  python main.py --config=configs/prune.py --workdir=runs/prune     # trains the fine-tune first
  python main.py --config=configs/prune.py:source=runs/distill/teacher --workdir=runs/prune
  python main.py --config=configs/prune.py:tiny --workdir=/tmp/prune                 # seconds
  python main.py --config=configs/prune.py:task=lm,source=runs/lm --workdir=runs/prune_lm
  python main.py --config=configs/prune.py --config.sparsities="(0.3, 0.5, 0.7)" \
      --config.variants="('magnitude-global', 'wanda-output')" --config.recover="()" \
      --workdir=runs/prune_sweep

Arguments (after the colon): those of configs/ptq.py (tiny, task, source, mesh).
`config.variants` entries are '<method>-<granularity>' (methods magnitude | random | taylor |
wanda | sparsegpt; granularities layer | global | output), each run at every sparsity of
`config.sparsities`, or '<method>-<n>:<m>' (2:4) or 'magnitude-structured' (heads and MLP
neurons: `config.prune.heads_fraction`, `neurons_fraction`; a smaller dense model) once.
`config.recover` names the variants that also get a recovery fine-tune (training fields of
configs/finetune.py, or configs/pretrain.py for task=lm, shortened as QAT's are), taught by the
dense source's logits unless `config.recovery_distill=False`. Every other recipe field is `config.prune`
(llmopt_jax/prune/config.py documents each one).
"""

import ml_collections

from llmopt_jax import configlib
from llmopt_jax.prune import config as prune_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configlib.parse_arg(arg, tiny=False, task='banking77', source='', mesh='data')
  lm = arg.task == 'lm'
  # The source, calibration batches, data and evaluation are the quantization stages'.
  config = configlib.sibling('qat', tiny=arg.tiny, task=arg.task, source=arg.source,
                             mesh=arg.mesh)
  config.stage = 'prune'
  for field in ('quant', 'qat'):
    del config[field]
  config.prune = prune_config.section(heads_fraction=0.25, neurons_fraction=0.5)
  # Wanda and SparseGPT compare weights within each output channel, as in their papers.
  config.variants = ('random-layer', 'magnitude-layer', 'magnitude-global', 'taylor-layer',
                     'wanda-output', 'sparsegpt-output', 'magnitude-2:4', 'wanda-2:4',
                     'sparsegpt-2:4', 'magnitude-structured')
  config.sparsities = (0.3, 0.5, 0.7)
  config.recover = ('magnitude-global', 'magnitude-structured')
  # Recovery learns from the dense source's logits (configs/distill.py's `distill` fields,
  # online, logits only) rather than the labels alone.
  config.recovery_distill = True
  config.calibration.examples = 128 if not lm else 64
  if arg.tiny:  # every part runs in about a minute; the figures mean nothing
    config.variants = ('magnitude-global', 'wanda-output', 'sparsegpt-2:4',
                       'magnitude-structured')
    config.sparsities = (0.5,)
    config.calibration.examples = 16
    config.prune.sparsegpt_block = 16
  return config

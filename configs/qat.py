"""Quantization-aware training: int8 and int4 fine-tuned through fake quantization with
straight-through gradients, from a trained model, beside PTQ of the same model.

  python main.py --config=configs/qat.py --workdir=runs/qat       # trains the fine-tune first
  python main.py --config=configs/qat.py:source=runs/distill/teacher --workdir=runs/qat
  python main.py --config=configs/qat.py:source=runs/distill --workdir=runs/qat_student
  python main.py --config=configs/qat.py:distill=True --workdir=runs/qat_kd
  python main.py --config=configs/qat.py:tiny --workdir=/tmp/qat                     # seconds
  python main.py --config=configs/qat.py --config.quant.scale=learned --workdir=runs/qat_lsq
  python main.py --config=configs/qat.py:task=lm,source=runs/lm --workdir=runs/qat_lm

Arguments (after the colon): those of configs/ptq.py, and distill=<True|False>: train against
the float source's logits (configs/distill.py's `distill` fields, online) instead of the labels.
Training fields (optim, train, checkpoint, early_stopping) are those of configs/finetune.py
(configs/pretrain.py for task=lm) with a shorter, gentler schedule: QAT starts from a trained
model and only has to adapt it to the grid.
"""

import ml_collections

from llmopt_jax import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configlib.parse_arg(arg, tiny=False, task='banking77', source='', mesh='data',
                            distill=False)
  lm = arg.task == 'lm'
  config = configlib.sibling('ptq', tiny=arg.tiny, task=arg.task, source=arg.source,
                             mesh=arg.mesh)
  config.stage = 'qat'
  config.variants = ('int8', 'int4-group') if not arg.tiny else ('int4-group',)

  config.qat = ml_collections.ConfigDict()
  config.qat.distill = arg.distill
  # Logit distillation from the float source (fields as in configs/distill.py; online only).
  config.distill = configlib.sibling('distill', tiny=arg.tiny, task=arg.task).distill
  config.distill.mode = 'online'

  if not lm:
    # About one epoch of Banking77 at a tenth of the fine-tune's peak lr.
    config.optim = configlib.optimizer(lr=2e-5, warmup_steps=20)
    config.optim.weight_decay = 0.01
    config.train.num_steps = 300
    config.train.eval_every = 100
    config.checkpoint.every_steps = 100
  else:
    config.optim.lr = 3e-4
    config.optim.warmup_steps = 20
    config.train.num_steps = 200
    config.train.eval_every = 50
    config.checkpoint.every_steps = 50
  if arg.tiny:
    config.optim.lr = 1e-4 if not lm else 1e-3
    config.optim.warmup_steps = 2
    config.train.num_steps = 10
    config.train.eval_every = 10
    config.checkpoint.every_steps = 10
  return config

"""Post-training quantization of a trained model: int8 and int4, per-channel and per-group,
each read back from its integer files and scored beside float32 and bfloat16.

  python main.py --config=configs/ptq.py --workdir=runs/ptq       # trains the fine-tune first
  python main.py --config=configs/ptq.py:source=runs/distill/teacher --workdir=runs/ptq
  python main.py --config=configs/ptq.py:source=runs/distill --workdir=runs/ptq_student
  python main.py --config=configs/ptq.py:tiny --workdir=/tmp/ptq                     # seconds
  python main.py --config=configs/ptq.py:source=runs/distill/teacher \
      --config.quant.activations=static --config.quant.calibration=percentile \
      --config.variants="('int8',)" --workdir=runs/ptq_w8a8
  python main.py --config=configs/ptq.py:task=lm,source=runs/lm --workdir=runs/ptq_lm

Arguments (after the colon): tiny, task=<banking77|clinc150|lm>, source=<a finished
fine-tune or pretrain workdir, or a distill workdir (its student_kd; see source.student);
'' = train one in <workdir>/source first>, mesh=<data|fsdp|...>.
The recipe is `config.quant` (llmopt_jax/quant/config.py documents every field); each entry of
`config.variants` sets its bit width and granularity: int8 | int4, optionally -channel
(default), -group (quant.group_size) or -tensor.
"""

import ml_collections

from llmopt_jax import configlib
from llmopt_jax.quant import config as quant_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configlib.parse_arg(arg, tiny=False, task='banking77', source='', mesh='data')
  return quantization(arg, 'ptq')


def quantization(arg: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """The fields both quantization stages share (configs/qat.py builds on this)."""
  lm = arg.task == 'lm'
  base = dict(tiny=arg.tiny, mesh=arg.mesh, **({} if lm else {'task': arg.task}))
  sibling = 'pretrain' if lm else 'finetune'
  config = configlib.sibling(sibling, **base)  # data, evaluation (and QAT's training) fields
  config.stage = stage
  config.task = 'lm' if lm else 'classification'

  config.source = ml_collections.ConfigDict()
  # A finished run: a fine-tune (classification) or pretrain (lm) workdir, or a distill
  # workdir, whose student `source.student` is then quantized. '' = <workdir>/source, trained
  # with `source.config` first if it has not finished.
  config.source.workdir = arg.source
  config.source.student = 'student_kd'   # or 'student_labels'
  config.source.config = configlib.sibling(sibling, **base)

  config.quant = quant_config.section()
  config.variants = ('int8', 'int8-group', 'int4', 'int4-group')
  config.calibration = ml_collections.ConfigDict()
  config.calibration.examples = 256      # training examples for static activation ranges
  if arg.tiny:  # every part runs in about a minute; the figures mean nothing
    config.variants = ('int8', 'int4-group')
    source = config.source.config
    source.train.num_steps = 10
    source.train.eval_every = 10
    source.checkpoint.every_steps = 10
    if not lm:
      source.export = False
    for run in (config, source):
      run.train.eval_batches = 2
      if not lm:
        run.test_batches = 2
    config.calibration.examples = 64
    if lm:
      config.quant.group_size = 64         # the tiny decoder's MLP is 192 wide
  return config

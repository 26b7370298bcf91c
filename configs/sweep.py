"""Search the hyperparameters of any other config, or ablate named variants of it over seeds,
with Optuna: every trial an ordinary run in <workdir>/trials/<number>/.

  python main.py --config=configs/sweep.py --workdir=runs/sweep          # MiniLM on Banking77
  python main.py --config=configs/sweep.py:base=configs/finetune.py --workdir=runs/sweep
  python main.py --config=configs/sweep.py:base=pretrain,tiny --workdir=/tmp/sweep  # seconds
  python main.py --config=configs/sweep.py:base=finetune,base_arg=tiny;task=clinc150 \
      --workdir=runs/sweep_clinc
  python main.py --config=configs/sweep.py:base=pretrain --config.sweep.sampler=random \
      --config.sweep.trials=30 --config.sweep.space.optim.lr="('float', 1e-4, 1e-2, 'log')" \
      --config.sweep.space.optim.weight_decay="()" --config.base.train.num_steps=200 \
      --workdir=runs/sweep_lm
  # More workers: the same command again, in another shell or on a machine sharing the workdir.
  # Many machines: --config.sweep.storage=postgresql://user@host:5432/optuna
  # An LLM proposes the trials (any OpenAI-compatible server; the key from $OPENAI_API_KEY):
  python main.py --config=configs/sweep.py --config.sweep.sampler=llm \
      --config.sweep.llm.base_url=http://localhost:8000/v1 --config.sweep.llm.model=qwen3-8b \
      --config.sweep.llm.api_key_env=OPENAI_API_KEY --workdir=runs/hpo_llm
  # ...and the same study again from its recorded answers, with no server:
  python main.py --config=configs/sweep.py --config.sweep.sampler=llm \
      --config.sweep.llm.backend=replay --config.sweep.llm.replay_from=runs/hpo_llm \
      --workdir=runs/hpo_llm_replay

Arguments (after the colon): base=<a config file, or a name under configs/; default finetune>,
base_arg=<the base config's own argument, with ';' for ','>, tiny (the base's tiny config, a
4-trial study). `config.base` is the base config, built here and recorded whole, so any of its
fields can be set on the command line (--config.base.train.num_steps=100) and a rerun that
changes one is refused. An ablation is a config file of its own that calls
`configlib.sibling('sweep', ...)` and fills `config.sweep.variants` (llmopt_jax/sweeps/space.py).
"""

import ml_collections

from llmopt_jax import configlib
from llmopt_jax.sweeps import config as sweep_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configlib.parse_arg(arg, base='finetune', base_arg='', tiny=False)
  base_file = sweep_config.base_config_file(arg.base)
  base_args = [a for a in arg.base_arg.split(';') if a]
  if arg.tiny and 'tiny' not in base_args:
    base_args.append('tiny')
  base_args = ','.join(base_args)
  config = ml_collections.ConfigDict()
  config.stage = 'sweep'
  config.base = sweep_config.load_base(f'{base_file}:{base_args}')
  if 'export' in config.base:  # a merged Hugging Face copy per trial (90 MB for MiniLM): the
    config.base.export = False  # best trial's command with --config.export=True makes one
  config.sweep = _sweep(config.base, f'{base_file}:{base_args}' if base_args else base_file,
                        arg.tiny)
  return config


def _sweep(base: ml_collections.ConfigDict, base_config: str,
           tiny: bool) -> ml_collections.ConfigDict:
  sweep = ml_collections.ConfigDict()
  sweep.base_config = base_config  # how config.base was built; trials' commands start with it
  sweep.sampler = 'tpe'            # tpe | random | grid | cmaes | gp (needs torch) | qmc |
                                   # llm | llm_warm_start (sweep.llm; sweeps/llm_sampler.py)
  sweep.sampler_seed = 0           # each worker adds its number; -1 = unseeded
  sweep.trials = 4 if tiny else 20  # finished trials of the study, all workers together
                                    # (0 with sampler=grid: the whole grid)
  sweep.seeds = 1                  # runs per trial, seeds base.seed, base.seed + 1, ...
  # What a trial is judged by: 'eval/<name>' is the run's last evaluation (validation);
  # 'test/<name>' its report.json (a fine-tune's test split, scored once, on the best step).
  classifier = base.get('stage') == 'finetune'
  sweep.metric = 'eval/accuracy' if classifier else base.early_stopping.metric
  sweep.direction = ('maximize' if classifier or base.early_stopping.mode == 'max'
                     else 'minimize')
  sweep.startup_trials = 10        # tpe, gp, cmaes: random trials before the model is used
                                   # (Optuna's default; with a budget of 10, tpe = random
                                   # unless this is lowered)
  sweep.pruner = 'median'          # none | median | hyperband; fed by each evaluation
  sweep.pruner_startup_trials = 5  # median: no pruning before this many trials finished
  sweep.pruner_warmup_steps = 0    # nor before this step of a trial (hyperband: its first
                                   # rung is the first evaluation from this step on)
  sweep.storage = ''               # '' = <workdir>/study.db (SQLite); or a database URL
  sweep.study_name = 'sweep'
  sweep.heartbeat_s = 10           # a worker silent for 3 heartbeats is taken for dead and
  sweep.max_retries = 3            # its trial retried, resuming from its checkpoint
  sweep.space = _space(base, tiny)
  sweep.variants = ml_collections.ConfigDict()  # name -> base overrides (an ablation)
  sweep.baseline = ''              # the variant the others are compared with
  sweep.enqueue_base = False       # trial 0 = the base config's own values (a fair start
                                   # for random or TPE against an LLM that knows defaults)
  sweep.llm = _llm(base)
  return sweep


def _llm(base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The LLM advisor of samplers llm / llm_warm_start (llmopt_jax/sweeps/llm_config.py)."""
  llm = ml_collections.ConfigDict()
  llm.backend = 'http'             # http (an OpenAI-compatible server) | replay
  llm.base_url = 'http://localhost:8000/v1'  # vLLM, Ollama (:11434/v1), a hosted API, or
                                   # this project's serve stage
  llm.model = ''                   # the model name the server knows (required for http)
  llm.api_key_env = ''             # the environment variable holding the key ('' = none);
                                   # the key itself never goes into a config or a file
  llm.timeout_s = 120.0
  llm.temperature = 0.7
  llm.max_tokens = 1024
  llm.json_mode = False            # ask for response_format json_object where supported
  llm.max_attempts = 3             # answers per trial (each rejection is sent back to the
                                   # model); then TPE samples the trial
  llm.warm_start_trials = 5        # llm_warm_start: trials 0..k-1 from the LLM, then TPE
  llm.history_best = 5             # the prompt shows the best trials so far...
  llm.history_recent = 5           # ...and the latest others
  llm.prompt = ''                  # '' = the default template (sweeps/prompt.py), a .txt
                                   # file, or the template text with {placeholders}
  llm.task_card = ml_collections.ConfigDict()  # '' = filled in from the sweep and machine
  llm.task_card.dataset = _dataset_card(base)
  llm.task_card.model = _model_card(base)
  llm.task_card.metric = ''
  llm.task_card.budget = ''
  llm.task_card.hardware = ''
  llm.task_card.notes = ''
  llm.replay_from = ''             # backend=replay: the recorded sweep's workdir or database URL
  llm.replay_study = ''            # '' = this sweep's study_name
  return llm


def _dataset_card(base: ml_collections.ConfigDict) -> str:
  data = base.get('data', {})
  name = data.get('name', '')
  known = {'banking77': 'Banking77: online-banking customer service queries, 77 intents, '
                        '10k training examples',
           'clinc150': 'CLINC150: virtual-assistant queries, 150 intents plus out-of-scope',
           'tiny_shakespeare': "Tiny Shakespeare: 1 MB of Shakespeare's plays, language "
                               'modelling'}
  return known.get(name, name or str(data.get('path', '')))


def _model_card(base: ml_collections.ConfigDict) -> str:
  init = base.get('init', {}).get('model', '')
  if init == 'minilm':
    return ('all-MiniLM-L6-v2, a pretrained 6-layer transformer sentence encoder (22M '
            'parameters), fine-tuned with a classification head')
  if init:
    return f'the pretrained transformer at {init}, fine-tuned'
  model = base.get('model', {})
  layers, dim = model.get('num_layers', ''), model.get('embed_dim', '')
  return (f'a {model.get("family", "")} transformer trained from scratch'
          + (f', {layers} layers of width {dim}' if layers and dim else ''))


def _space(base: ml_collections.ConfigDict, tiny: bool) -> ml_collections.ConfigDict:
  """Around the base's own values: the learning rate over 1.5 decades (the field that
  matters most), weight decay and warmup. Under `tiny`, the learning rate alone. Batch size
  and the number of steps are listed switched off, `()`, so that a command line can search
  them (--config.sweep.space.train.batch_size="('categorical', (16, 32, 64))"): a command
  line can set a field, not add one."""
  space = ml_collections.ConfigDict()
  if 'optim' not in base:  # not a training config: name the fields to search yourself
    return space
  lr = base.optim.lr
  space.optim = ml_collections.ConfigDict()
  space.optim.lr = ('float', lr / 3, lr * 3, 'log') if tiny else ('float', lr / 10, lr * 3,
                                                                  'log')
  if not tiny:
    space.optim.weight_decay = ('float', 0.0, 0.1)
    space.optim.warmup_steps = ('int', 0, max(1, base.train.num_steps // 4))
  if 'train' in base:
    space.train = ml_collections.ConfigDict()
    space.train.batch_size = ()
    space.train.num_steps = ()
  return space

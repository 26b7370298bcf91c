"""Multi-task fine-tuning: all-MiniLM-L6-v2 on Banking77 and CLINC150 at once, one encoder and
one head per task, against each task trained alone for the same budget.

  python main.py --config=configs/multitask.py --workdir=runs/mt
  python main.py --config=configs/multitask.py:tiny --workdir=/tmp/mt                 # minutes
  python main.py --config=configs/multitask.py --config.multitask.mixing=temperature \
      --config.multitask.temperature=2 --workdir=runs/mt_t2
  python main.py --config=configs/multitask.py --config.multitask.mixing=explicit \
      --config.multitask.rates="('banking77:1','clinc150:1')" --workdir=runs/mt_even
  python main.py --config=configs/multitask.py:tasks=banking77+mine \
      --config.tasks.mine.path=tickets.csv --config.tasks.mine.test_path=tickets_test.csv \
      --config.tasks.mine.text_field=body --config.tasks.mine.label_field=queue \
      --workdir=runs/mt_mine
  python main.py --config=configs/multitask.py --config.multitask.baselines=False \
      --workdir=runs/mt_only

The run trains the multi-task model in <workdir>, then (multitask.baselines) each task alone
in <workdir>/single_<task> with the same start, seed, batch size and number of steps, and
ends with report.md / report.json: per task, test accuracy and macro-F1 of both and the
difference.

Arguments (after the colon): tiny, tasks=<names joined by '+'; banking77 and clinc150 are the
shipped sets, any other name is a user's file task (set its path and test_path)>,
model=<minilm | a Hugging Face directory | a pretrain workdir>, peft=<none|lora>,
mesh=<data|fsdp|tensor|fsdp_tensor>. The model, optimizer, head and training fields are those
of configs/finetune.py.
"""

import ml_collections

from llmopt_jax import configlib

SHIPPED = ('banking77', 'clinc150')
# Fields of configs/finetune.py's `data` that every task shares: one tokenizer length (so
# every batch has one shape and the step one compiled program), one sampling, one few-shot
# cut and one augmentation. Where the texts come from is per task (config.tasks.<name>).
SHARED_DATA = ('max_len', 'balanced', 'num_shards', 'shots_per_class', 'shots_seed', 'augment',
               'augment_copies', 'augment_mask')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configlib.parse_arg(arg, tiny=False, tasks='+'.join(SHIPPED), model='', peft='none',
                            mesh='data')
  config = configlib.sibling('finetune', tiny=arg.tiny, model=arg.model, peft=arg.peft,
                             mesh=arg.mesh)
  config.stage = 'multitask'
  del config['export']  # no per-task export: the run ends with its report
  if 'consistency' in config:  # the fine-tune's UDA term; the multi-task loss has none
    del config['consistency']
  config.data = ml_collections.ConfigDict({k: config.data[k] for k in SHARED_DATA})

  names = tuple(name for name in arg.tasks.split('+') if name)
  config.tasks = ml_collections.ConfigDict({name: _task(name) for name in names})
  config.multitask = ml_collections.ConfigDict()
  config.multitask.tasks = names           # the tasks trained, in this order (head blocks)
  # 'proportional' to each task's training examples (T5), 'temperature' (size^(1/T): larger T
  # flattens toward uniform, mT5's T = 3.33), or 'explicit' rates ('task:rate', normalised).
  config.multitask.mixing = 'proportional'
  config.multitask.temperature = 2.0
  config.multitask.rates = ()              # e.g. ('banking77:1', 'clinc150:1')
  config.multitask.cap = 0                 # examples per task the rates count; 0 = no cap
  # Also train each task alone with the same start, seed, batch size and number of steps.
  config.multitask.baselines = True

  # The mean over tasks of each task's validation accuracy: a large task cannot outvote a
  # small one, as it would in a pooled accuracy or a macro-F1 over all their classes.
  config.early_stopping.metric = 'eval/accuracy'
  config.early_stopping.mode = 'max'
  if arg.tiny:  # every part runs; the figures mean nothing
    config.train.num_steps = 20
    config.train.eval_every = 10
    config.train.eval_batches = 2          # per task
    config.checkpoint.every_steps = 10
    config.test_batches = 4                # per task
  else:
    # ~2 epochs of both training sets together (24k queries); each single-task baseline
    # gets the same 1,700 steps on its task alone.
    config.train.num_steps = 1700
    config.train.eval_every = 340
    config.checkpoint.every_steps = 340
  return config


def _task(name: str) -> ml_collections.ConfigDict:
  """Task `name`'s source: a shipped set under its own name, else a user's file."""
  task = ml_collections.ConfigDict()
  task.dataset = name if name in SHIPPED else 'file'   # 'banking77' | 'clinc150' | 'file'
  task.path = ''                           # dataset 'file': CSV, TSV or JSONL with a header
  task.text_field = 'text'
  task.label_field = 'label'
  task.validation_path = ''                # '' = carve validation_fraction out of train
  task.test_path = ''                      # a file task needs one: the report scores test
  task.validation_fraction = 0.1           # Banking77 has no validation split: 10% per class
  return task

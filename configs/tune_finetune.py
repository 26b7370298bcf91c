"""Tune the full MiniLM fine-tune of configs/finetune.py (Banking77 by default): learning rate,
training length, batch size, warmup, weight decay and maximum query length, chosen on the
validation split by TPE with Hyperband pruning. Trial 0 is the default config itself, so the
study measures its own baseline. The test split is scored by every trial's run but read only
for the trial that validation picks (report.md's best trial).

  python main.py --config=configs/tune_finetune.py --workdir=runs/tune_ft
  python main.py --config=configs/tune_finetune.py:tiny --workdir=/tmp/tune_ft    # minutes
  python main.py --config=configs/tune_finetune.py:task=clinc150 --workdir=runs/tune_clinc

Arguments (after the colon): tiny, task=<banking77|clinc150|file>. Every field of
configs/sweep.py can be set on the command line (--config.sweep.trials=30 ...).
"""

import ml_collections

from llmopt_jax import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configlib.parse_arg(arg, tiny=False, task='banking77')
  base_arg = ';'.join([f'task={arg.task}'] + (['tiny'] if arg.tiny else []))
  config = configlib.sibling('sweep', base='finetune', base_arg=base_arg, tiny=arg.tiny)
  base, sweep = config.base, config.sweep
  sweep.sampler = 'tpe'
  sweep.startup_trials = 5         # random trials before TPE models the rest: a CPU budget
  sweep.trials = 4 if arg.tiny else 12
  sweep.enqueue_base = True        # trial 0 = the default: the baseline, measured in the study
  # Hyperband on training steps: a trial is first judged at its first rung and again at
  # three times that, against the trials of its bracket at the same step.
  sweep.pruner = 'hyperband'
  steps = base.train.num_steps
  space = sweep.space
  space.optim.lr = ('float', base.optim.lr / 3, base.optim.lr * 10, 'log')
  space.optim.weight_decay = ('float', 0.0, 0.1)
  space.optim.warmup_steps = ('int', 0, max(1, steps // 4))
  # No trial is judged inside its warmup: the first rung is the first evaluation after the
  # longest warmup (the study in experiments/results/tune_finetune_banking77.md, run before
  # this, pruned a trial at step 170 of its 207-step warmup).
  sweep.pruner_warmup_steps = space.optim.warmup_steps[2]
  # Length as steps at each batch size: 850 steps of 32 are ~3 epochs of the 9k queries, so
  # the choices span 0.75 to 4.5 epochs. Batch 64 is left out for the CPU budget (a 9k-query
  # fine-tune rarely gains from it); no trial reads more than 1.5x the default's queries.
  space.train.num_steps = ('categorical', (steps // 2, steps, steps * 3 // 2))
  space.train.batch_size = ('categorical', (16, 32))
  # Batches are padded to data.max_len: 32 tokens cut 7% of Banking77's training queries, 48
  # cut 1.5% (at 1.5x the cost per query).
  space.data = ml_collections.ConfigDict()
  space.data.max_len = ('categorical', (base.data.max_len // 2, base.data.max_len) if arg.tiny
                        else (32, 48))
  return config

"""The task layer: what stages share, assembled from the core and the techniques.

  lm.py              next-token prediction on a text corpus (pretraining, the LM fine-tune)
  classification.py  sequence classification on labelled texts
  consistency_training.py  UDA's consistency term in the classification loss
  multitask.py       one encoder, a block of classifier outputs per task, per-task metrics
  peft.py            LoRA's `Task` fields and parameter counts
  starting_point.py  a fine-tune's starting weights: Hugging Face, or a finished pretrain run
  finished.py        the one loader of a finished run (its model card and best parameters)
  problem.py         what distillation and quantization need of a task (feeding, scoring)
  scoring.py         one comparison-table row of a model variant (quality, size, latency)
  export.py          the Hugging Face export that ends every fine-tune

Nothing here imports `llmopt_jax.stages`; a stage assembles these pieces into its recipe.
"""

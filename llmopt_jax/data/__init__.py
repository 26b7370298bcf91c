"""Input data: text sources, tokenizers, packed LM batches and labelled classification sets.

  sources.py           documents of a split as a random-access sequence of str (TFDS)
  tokenizers.py        byte and byte-level BPE tokenizers
  lm_pipeline.py       packed, sharded, resumable LM training batches and eval batches
  labelled.py          labelled texts: user CSV/TSV/JSONL files, stratified validation carve-out
  intents.py           the shipped intent sets, Banking77 and CLINC150
  classification.py    sharded, resumable (optionally class-balanced) classification batches
  utf8.py              users' text files decoded strictly: the offset of the first bad byte
  few_shot.py          K-shot training subsets by seed; the rest kept as unlabelled text
  augment/             text augmentation in the pipeline (EDA, character noise, masking) and
                       the WordNet-derived synonym table, with its license
  mixture.py           multi-task mixtures: rates and a resumable task schedule
  multitask.py         multi-task sources, label blocks and the mixed batch iterator
  unlabelled.py        unlabelled text beside the labelled batches (consistency training,
                       distillation transfer sets), paired and resumable
  tiny_shakespeare/    the shipped corpus and its TFDS builder
  banking77/, clinc150/  the shipped intent data, with their PROVENANCE.md

Modules are imported by name (`from llmopt_jax.data import sources`) so that importing the
package stays cheap.
"""

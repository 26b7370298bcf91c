"""Text augmentation for classification training: cheap, deterministic edits of a query.

  config.py          AugmentConfig: config.data's operations, rates and copies, checked once
  pipeline.py        Augmenter: copy k of example i in epoch e, drawn from (seed, e, i, k)
  words.py           word edits (EDA): delete, swap, insert, synonym; and mask
  chars.py           character noise: typo (keyboard neighbours), char_drop, case_flip
  synonyms.py        the WordNet-derived synonym table shipped here (synonyms.tsv)
  build_synonyms.py  regenerates synonyms.tsv from WordNet 3.0, offline, by hand
  rewrite_config.py  config.data.rewrite: the generator of paraphrases and back-translations
  rewrites.py        those rewrites of every training example, made once per run, kept on disk

Every edit is a pure function of (text, rate, random generator): it never empties a text and
never touches labels, which stay with their rows in the batch. The expensive operations
(paraphrase, back-translation) are not per-batch edits: a model writes them once, before
training (`rewrites.py`, through `inference/rewriters.py`), and the pipeline only draws, per
copy and epoch, whether a copy starts from its rewrite.
"""

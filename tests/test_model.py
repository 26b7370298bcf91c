"""Properties of the model families: shapes, masking, GQA, RoPE, parameter counts, dropout,
sharding, padding, pooling and the classification head. (Parity with Hugging Face: test_hf.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tolerances
from llmopt_jax import optim, sharding
from llmopt_jax.models import heads
from llmopt_jax.models import layers
from llmopt_jax.models import stats
from llmopt_jax.models.config import PRESETS, TransformerConfig, get_preset
from llmopt_jax.models.transformer import Transformer

TINY = get_preset('tiny')
B, T = 2, 12
_MHA = dict(num_kv_heads=4, mlp_dim=256, max_positions=32)
FAMILIES = {
    'llama': TINY,
    'qwen2': TINY.replace(attention_bias=True, tie_embeddings=False),
    'gpt2': TINY.replace(family='gpt2', **_MHA),
    'bert': TINY.replace(family='bert', type_vocab_size=2, lm_head=False, **_MHA),
}


def _tokens(seed: int = 0, vocab: int = TINY.vocab_size) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (B, T), 0, vocab)


def _forward_tolerance(cfg: TransformerConfig, logits) -> float:
  """Two programs computing the same forward pass on [B, T] tokens (tests/tolerances.py)."""
  return tolerances.sum_tolerance(tolerances.forward_terms(cfg, T), float(np.max(np.abs(logits))))


def _params(model: nnx.Module) -> list[nnx.Variable]:
  state = nnx.state(model, nnx.Param)
  return jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@pytest.fixture(scope='module')
def tiny_model() -> Transformer:
  return Transformer(TINY, rngs=nnx.Rngs(0))


def test_logits_shape_dtype_and_jit(tiny_model):
  tokens = _tokens()
  logits = tiny_model(tokens)
  assert logits.shape == (B, T, TINY.vocab_size)
  assert logits.dtype == jnp.float32
  graphdef, state = nnx.split(tiny_model, nnx.Param)
  jitted = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))(state, tokens)
  # Eager ops against one fused program: the same sums, maybe in another order.
  np.testing.assert_allclose(jitted, logits, rtol=0, atol=_forward_tolerance(TINY, logits))


def test_bfloat16_compute_still_returns_float32_logits():
  cfg = TINY.replace(dtype='bfloat16', param_dtype='bfloat16')
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  assert all(p.dtype == jnp.bfloat16 for p in _params(model))
  logits = model(_tokens())
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_causal_future_tokens_do_not_leak(tiny_model):
  tokens = _tokens()
  t = 5
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % TINY.vocab_size)
  before, after = tiny_model(tokens), tiny_model(changed)
  # Masked keys get softmax weight exactly 0 (exp(-inf)), and the same program adds the same
  # values for the earlier positions: bit for bit.
  np.testing.assert_array_equal(before[:, :t], after[:, :t])
  assert bool(jnp.all(jnp.any(before[:, t:] != after[:, t:], axis=-1)))


def test_segments_do_not_attend_to_each_other(tiny_model):
  tokens = _tokens()
  segment_ids = jnp.array([[1] * 6 + [2] * 6] * B)
  changed = tokens.at[:, 2].set((tokens[:, 2] + 1) % TINY.vocab_size)
  before = tiny_model(tokens, segment_ids=segment_ids)
  after = tiny_model(changed, segment_ids=segment_ids)
  np.testing.assert_array_equal(before[:, 6:], after[:, 6:])  # untouched, as above: bitwise
  assert bool(jnp.any(before[:, 2:6] != after[:, 2:6]))  # later tokens of segment 1 see it
  # Without segment ids the same change does reach the second segment.
  assert bool(jnp.any(tiny_model(tokens)[:, 6:] != tiny_model(changed)[:, 6:]))


@pytest.mark.parametrize('num_kv_heads', [1, 2, 4])
def test_mqa_gqa_mha_all_run(num_kv_heads):
  cfg = TINY.replace(num_heads=4, num_kv_heads=num_kv_heads)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  assert model.blocks[0].attn.k.shape == (cfg.embed_dim, num_kv_heads, cfg.head_dim)
  logits = model(_tokens())
  assert logits.shape == (B, T, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))


def test_gqa_equals_mha_with_repeated_kv_weights():
  gqa_cfg = TINY.replace(num_heads=4, num_kv_heads=2)
  mha_cfg = gqa_cfg.replace(num_kv_heads=4)
  groups = gqa_cfg.num_heads // gqa_cfg.num_kv_heads
  gqa = Transformer(gqa_cfg, rngs=nnx.Rngs(0))
  mha = Transformer(mha_cfg, rngs=nnx.Rngs(1))
  params = nnx.to_pure_dict(nnx.state(gqa, nnx.Param))
  for block in params['blocks'].values():
    for name in ('k', 'v'):  # query head n reads kv head n // groups
      block['attn'][name] = jnp.repeat(block['attn'][name], groups, axis=1)
  mha_state = nnx.state(mha, nnx.Param)
  nnx.replace_by_pure_dict(mha_state, params)
  nnx.update(mha, mha_state)
  tokens = _tokens()
  # Grouped and plain attention are different einsums over the same values.
  reference = gqa(tokens)
  np.testing.assert_allclose(mha(tokens), reference, rtol=0,
                             atol=_forward_tolerance(gqa_cfg, reference))


def test_rope_scores_depend_only_on_relative_position():
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 32))  # [B=1, T=1, heads=1, H]

  def score(m, n):
    qm = layers.apply_rope(q, jnp.array([[m]]), theta=10000.0)
    kn = layers.apply_rope(k, jnp.array([[n]]), theta=10000.0)
    return jnp.sum(qm * kn)

  # How far a float32 score is from the exact one: each rotation angle position * f rounds by
  # half an ulp of itself and sin, cos by about an ulp of 1, turning each feature pair's
  # product by that angle; then the 32-term sum.
  pairs = lambda x: np.hypot(*np.split(np.asarray(x, np.float64).reshape(-1), 2))  # [16]
  inv_freq = 10000.0 ** (-np.arange(16) / 16)
  def error(m, n):
    turn = tolerances.EPS32 * ((m + n) * inv_freq + 2)
    return (np.sum(pairs(q) * pairs(k) * turn)
            + tolerances.sum_tolerance(32, np.sum(np.abs(np.asarray(q) * np.asarray(k)))))

  for m, n, shift in [(3, 1, 7), (10, 4, 100), (0, 0, 55)]:
    np.testing.assert_allclose(score(m, n), score(m + shift, n + shift), rtol=0,
                               atol=error(m, n) + error(m + shift, n + shift))
  assert abs(score(3, 1) - score(3, 2)) > 1e-3 > error(3, 2)  # it does depend on the offset
  np.testing.assert_allclose(  # a rotation keeps the norm: two 32-term sums, sin^2 + cos^2
      jnp.linalg.norm(layers.apply_rope(q, jnp.array([[9]]), 10000.0)), jnp.linalg.norm(q),
      rtol=tolerances.sum_tolerance(32 + 4, 1.0))


@pytest.mark.parametrize('config', [
    TINY, TINY.replace(tie_embeddings=False), TINY.replace(tie_embeddings=False, lm_head=False),
    *FAMILIES.values(), FAMILIES['gpt2'].replace(tie_embeddings=False), *PRESETS.values()],
    ids=['tiny', 'tiny_untied', 'tiny_no_head', *FAMILIES, 'gpt2_untied', *PRESETS])
def test_count_params_matches_model(config):
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  assert stats.count_params(config) == sum(p.size for p in _params(abstract))
  assert stats.param_bytes(config.replace(param_dtype='bfloat16')) == (
      2 * stats.count_params(config))


def test_flops_per_token_decomposes_as_documented():
  cfg = TINY
  norms = (2 * cfg.num_layers + 1) * cfg.embed_dim
  # Tied: every parameter but the norms is a matmul weight (the table is used as the output).
  assert stats.flops_per_token(cfg, 0) == 6 * (stats.count_params(cfg) - norms)
  attention_per_position = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim
  assert stats.flops_per_token(cfg, 256) - stats.flops_per_token(cfg, 128) == (
      128 * attention_per_position)
  # Counts in Python numbers; approx only absorbs a float product's last bits.
  assert stats.forward_flops_per_token(cfg, 64) * 3 == pytest.approx(
      stats.flops_per_token(cfg, 64))


@pytest.mark.parametrize('rates', [(0.1, 0.0), (0.0, 0.1), (0.0, 0.0)])
def test_dropout_only_with_rngs_and_positive_rate(rates):
  cfg = TINY.replace(dropout_rate=rates[0], attention_dropout_rate=rates[1])
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens()
  deterministic = model(tokens)
  np.testing.assert_array_equal(deterministic, model(tokens))  # same ops, same values
  stochastic = model(tokens, rngs=nnx.Rngs(dropout=1))
  assert bool(jnp.any(stochastic != deterministic)) == (max(rates) > 0)
  # No RNG state is stored in the module: the Param state is the whole state.
  assert len(_params(model)) == len(jax.tree.leaves(nnx.state(model)))


def test_dropout_inside_jit_draws_from_the_given_key():
  model = Transformer(TINY.replace(dropout_rate=0.2), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)

  @jax.jit
  def forward(state, tokens, key):
    return nnx.merge(graphdef, state)(tokens, rngs=nnx.Rngs(dropout=key))

  tokens = _tokens()
  first = forward(state, tokens, jax.random.key(1))  # one program, same inputs: bitwise
  np.testing.assert_array_equal(first, forward(state, tokens, jax.random.key(1)))
  assert bool(jnp.any(first != forward(state, tokens, jax.random.key(2))))


def test_every_param_has_logical_axes(tiny_model):
  untied = nnx.eval_shape(
      lambda: Transformer(TINY.replace(tie_embeddings=False), rngs=nnx.Rngs(0)))
  for model in (tiny_model, untied):
    for p in _params(model):
      axes = p.get_metadata('out_sharding')
      assert len(axes) == p.ndim, (axes, p.shape)
      assert set(axes) <= set(sharding.LOGICAL_AXES), axes
      assert p.get_metadata('eager_sharding') is False


def test_born_sharded_forward_matches_single_device():
  # One table maps both weights and activations, so `batch` cannot also use the axis `embed`
  # does: the activations' batch goes over `data` only here.
  rules = {**sharding.DATA_PARALLEL_RULES, 'batch': 'data', 'embed': 'fsdp', 'mlp': 'tensor',
           'heads': 'tensor', 'kv_heads': 'tensor', 'vocab': 'tensor'}
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  create = lambda: Transformer(TINY, rngs=nnx.Rngs(0))
  graphdef, abstract_state = nnx.split(nnx.eval_shape(create), nnx.Param)
  shardings = sharding.tree_shardings(abstract_state, mesh, rules)
  state = jax.jit(lambda: nnx.state(create(), nnx.Param), out_shardings=shardings)()
  assert state['blocks'][0]['mlp']['gate'][...].sharding.spec == jax.P('fsdp', 'tensor')

  tokens = jax.random.randint(jax.random.key(0), (4, T), 0, TINY.vocab_size)
  with sharding.use(mesh, rules):
    sharded = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
  # Contractions split over fsdp and tensor are added up in another order.
  reference = create()(tokens)
  np.testing.assert_allclose(sharded, reference, rtol=0,
                             atol=_forward_tolerance(TINY, reference))


@pytest.mark.parametrize('changes, field', [
    (dict(num_heads=4, num_kv_heads=3), 'num_heads'),
    (dict(embed_dim=0), 'embed_dim'),
    (dict(head_dim=15), 'head_dim'),
    (dict(dtype='float8'), 'dtype'),
    (dict(dropout_rate=1.0), 'dropout_rate'),
    (dict(family='t5'), 'family'),
    (dict(family='gpt2'), 'max_positions'),
    (dict(max_positions=16), 'max_positions'),
    (dict(type_vocab_size=2), 'type_vocab_size'),
    (dict(family='gpt2', max_positions=16, attention_bias=True), 'attention_bias'),
    (dict(family='bert', max_positions=16, sliding_window=4), 'sliding_window'),
    (dict(sliding_window=-1), 'sliding_window'),
])
def test_bad_config_names_the_field(changes, field):
  with pytest.raises(ValueError, match=field) as error:
    dataclasses.replace(TINY, **changes)
  assert '\n' not in str(error.value)


def test_unknown_preset_and_unknown_key_are_named():
  with pytest.raises(ValueError, match="'huge'.*tiny"):
    get_preset('huge')
  with pytest.raises(ValueError, match='num_layer'):
    TransformerConfig.from_dict({**dataclasses.asdict(TINY), 'num_layer': 3})
  assert TransformerConfig.from_dict(dataclasses.asdict(PRESETS['small'])) == PRESETS['small']
  assert get_preset('small', vocab_size=65).vocab_size == 65


def _all_params(model: nnx.Module):
  return jax.tree_util.tree_flatten_with_path(
      nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_every_family_names_axes_and_no_decay_params_the_same_way(family):
  # The trainer's weight-decay mask goes by the last name in a path: exactly the matmul
  # weights must be decayed, never a bias, a norm gain or an embedding table.
  model = nnx.eval_shape(lambda: heads.SequenceClassifier(
      FAMILIES[family], 3, pooling='cls', rngs=nnx.Rngs(0)))
  decays = dict(jax.tree_util.tree_flatten_with_path(optim.decay_mask(
      nnx.state(model, nnx.Param), decay_embeddings=False))[0])
  for path, p in _all_params(model):
    axes = p.get_metadata('out_sharding')
    assert len(axes) == p.ndim and set(axes) <= {*sharding.LOGICAL_AXES, None}, (path, axes)
    matrix = path[-1].key in ('q', 'k', 'v', 'o', 'gate', 'up', 'down', 'lm_head', 'kernel')
    assert decays[path] == matrix, path


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_padding_tokens_do_not_reach_real_positions(family):
  model = Transformer(FAMILIES[family], rngs=nnx.Rngs(0))
  mask = jnp.array([[1] * 8 + [0] * 4, [1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0]])
  tokens = _tokens()
  changed = jnp.where(mask > 0, tokens, (tokens + 7) % TINY.vocab_size)
  before = model.encode(tokens, padding_mask=mask)
  after = model.encode(changed, padding_mask=mask)
  # Padding keys get softmax weight exactly 0, and the same program adds the same values for
  # real positions: bit for bit.
  np.testing.assert_array_equal(before[mask > 0], after[mask > 0])
  # Without the mask real positions do read the padding (the second row pads in between).
  assert bool(jnp.any(model.encode(tokens)[mask > 0] != model.encode(changed)[mask > 0]))


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_only_bert_sees_later_tokens(family):
  model = Transformer(FAMILIES[family], rngs=nnx.Rngs(0))
  tokens = _tokens()
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % TINY.vocab_size)
  moved = bool(jnp.any(model.encode(tokens)[:, 0] != model.encode(changed)[:, 0]))
  assert moved == (family == 'bert')


def test_sliding_window_limits_the_keys_a_query_sees():
  model = Transformer(TINY.replace(num_layers=1, sliding_window=3), rngs=nnx.Rngs(0))
  tokens = _tokens()
  changed = tokens.at[:, 4].set((tokens[:, 4] + 1) % TINY.vocab_size)
  differs = jnp.any(model(tokens) != model(changed), axis=(0, 2))  # bitwise, as above
  np.testing.assert_array_equal(differs, (jnp.arange(T) >= 4) & (jnp.arange(T) < 4 + 3))


def test_bert_token_types_and_the_position_table_limit():
  model = Transformer(FAMILIES['bert'], rngs=nnx.Rngs(0))
  tokens = _tokens()
  types = jnp.zeros_like(tokens).at[:, 6:].set(1)
  assert bool(jnp.any(model.encode(tokens) != model.encode(tokens, token_types=types)))
  np.testing.assert_array_equal(  # the default is type 0: the same values added
      model.encode(tokens), model.encode(tokens, token_types=jnp.zeros_like(tokens)))
  with pytest.raises(ValueError, match='max_positions'):
    model.encode(jnp.zeros((1, 33), jnp.int32))
  with pytest.raises(ValueError, match='lm_head'):
    model(tokens)
  with pytest.raises(ValueError, match='type_vocab_size'):
    Transformer(TINY, rngs=nnx.Rngs(0)).encode(tokens, token_types=types)


def test_pooling_by_hand():
  # Small integers: sums and the mean (3 / 3, 4 / 1) are exact in float32.
  hidden = jnp.arange(2 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 1)  # [[0,1,2,3],[4,5,6,7]]
  mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(heads.pool(hidden, mask, 'cls')[:, 0], [0, 4])
  np.testing.assert_array_equal(heads.pool(hidden, mask, 'mean')[:, 0], [1, 4])
  np.testing.assert_array_equal(heads.pool(hidden, mask, 'last')[:, 0], [2, 4])
  np.testing.assert_array_equal(heads.pool(hidden, None, 'last')[:, 0], [3, 7])


@pytest.mark.parametrize('family', sorted(FAMILIES))
@pytest.mark.parametrize('pooling', heads.POOLINGS)
def test_sequence_classifier_carries_no_lm_head(family, pooling):
  config = FAMILIES[family].replace(tie_embeddings=False)
  model = heads.SequenceClassifier(config, 5, pooling=pooling, rngs=nnx.Rngs(0))
  assert model.backbone.lm_head is None and not model.backbone.config.lm_head
  assert (model.pooler is not None) == (family == 'bert' and pooling == 'cls')
  # HF's decoder classifiers (`score`) have no bias, BERT's `classifier` has one.
  assert (model.classifier.bias is not None) == (family == 'bert')
  mask = jnp.ones((B, T), jnp.int32).at[1, 7:].set(0)
  logits = model(_tokens(), padding_mask=mask)
  assert logits.shape == (B, 5) and logits.dtype == jnp.float32
  count = sum(p.size for _, p in _all_params(model))
  head = (config.embed_dim + 1) * config.embed_dim if model.pooler is not None else 0
  head += config.embed_dim * 5 + (5 if family == 'bert' else 0)
  assert count == stats.count_params(config.replace(lm_head=False)) + head


def test_bad_head_names_the_field():
  with pytest.raises(ValueError, match='pooling'):
    heads.SequenceClassifier(TINY, 3, pooling='max', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='num_labels'):
    heads.HeadConfig(0)

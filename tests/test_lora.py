"""LoRA as a transformation of the parameter tree, and freezing through the train step."""

import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import tolerances
from llmopt_jax import configlib, losses, lora, optim, sharding
from llmopt_jax.models import Transformer, get_preset
from llmopt_jax.train import state as state_lib
from llmopt_jax.train import step as step_lib

MODEL = get_preset('tiny', vocab_size=64, tie_embeddings=False)


def build(rngs: nnx.Rngs) -> Transformer:
  return Transformer(MODEL, rngs=rngs)


@functools.cache
def plain_params():
  """The tiny model's graphdef and parameters, built once (and compiled, not op by op)."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(nnx.Rngs(params=0))))
  # An rbg key: XLA compiles its initialisation about three times faster on CPU than threefry.
  key = jax.random.key(0, impl='unsafe_rbg')
  return graphdef, jax.jit(lambda: nnx.state(build(nnx.Rngs(params=key)), nnx.Param))()


def with_adapters(cfg: lora.LoraConfig, seed: int):
  return jax.jit(lambda p: lora.add_adapters(p, cfg, jax.random.key(seed)))(plain_params()[1])


@functools.cache
def logits_fn(cfg: lora.LoraConfig | None):
  """Logits of a plain (cfg None) or LoRA parameter tree, through the jitted eval step."""
  transform = None if cfg is None else lora.params_transform(cfg)
  return jax.jit(step_lib.make_eval_step(
      plain_params()[0], lambda model, batch: model(batch['inputs']), params_transform=transform))


def lm_batch(seed: int = 0) -> dict:
  tokens = jax.random.randint(jax.random.key(seed), (4, 17), 0, MODEL.vocab_size)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'weights': jnp.ones((4, 16), jnp.float32)}


def optim_config(**overrides) -> optim.OptimConfig:
  config = configlib.optimizer(lr=1e-2, warmup_steps=0)
  config.update(schedule='constant', **overrides)
  return optim.OptimConfig.from_config(config)


def flat(tree) -> dict[str, np.ndarray]:
  return {optim.param_path(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}


def train(steps: int, optim_cfg, cfg: lora.LoraConfig | None = None):
  """Initial and final state and the losses of `steps` steps on one batch."""
  graphdef, params = plain_params()  # (reused: compiling the model's init is the slow part)
  frozen = transform = None
  if cfg is not None:
    frozen, transform = lora.is_frozen(cfg), lora.params_transform(cfg)
    params = with_adapters(cfg, 7)
  tx = optim.make_optimizer(optim_cfg, steps, frozen=frozen)
  step = jax.jit(step_lib.make_train_step(
      graphdef, tx, losses.lm_loss, seed=0, params_transform=transform))
  start = state = state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(tx.init)(params))
  batch, history = lm_batch(), []
  for _ in range(steps):
    state, metrics = step(state, batch)
    history.append(float(metrics['loss'][0] / metrics['loss'][1]))
  return graphdef, tx, start, state, history


def test_input_output_split_of_every_kernel():
  _, params = plain_params()
  adapters = flat(with_adapters(lora.LoraConfig(rank=3, targets=(r'.*',)), 0)['lora'])
  expected_inputs = {'q': 1, 'k': 1, 'v': 1, 'o': 2, 'gate': 1, 'up': 1, 'down': 1,
                     'lm_head': 1, 'embedding': 1}
  for parts, kernel in nnx.to_flat_state(params):
    path, shape = optim.param_path(parts), kernel.get_value().shape
    if len(shape) < 2:  # norm scales are never adapted, even by a catch-all pattern
      assert f'{path}/lora_a' not in adapters
      continue
    n_in = expected_inputs[parts[-1]]
    assert lora.input_dims(kernel) == n_in, path
    a, b = adapters[f'{path}/lora_a'], adapters[f'{path}/lora_b']
    assert a.shape == (*shape[:n_in], 3) and b.shape == (3, *shape[n_in:]), path
    assert np.tensordot(a, b, axes=1).shape == shape
    assert not b.any()


def test_biases_and_scales_are_never_adapted():
  param = lambda shape, axes: nnx.Param(jnp.ones(shape), out_sharding=axes, eager_sharding=False)
  params = nnx.State({'attn': {
      'q': param((4, 3, 2), ('embed', 'heads', 'kv')),
      'q_bias': {'bias': param((3, 2), ('heads', 'kv'))},
      'q_norm': {'scale': param((3, 2), ('heads', 'kv'))}}})
  cfg = lora.LoraConfig(rank=2, targets=(r'.*attn/q.*',))
  adapters = flat(lora.add_adapters(params, cfg, jax.random.key(0))['lora'])
  assert set(adapters) == {'attn/q/lora_a', 'attn/q/lora_b'}


def test_adapters_are_born_sharded_like_their_kernel():
  """The shardings `initialize` writes the state into (derived without allocating anything)."""
  cfg = lora.LoraConfig(rank=4)
  tx = optim.make_optimizer(optim_config(), 10, frozen=lora.is_frozen(cfg))
  _, init = state_lib.init_fn(
      build, tx, seed=0, extend_params=lambda p: lora.add_adapters(p, cfg, jax.random.key(1)))
  mesh, rules = sharding.from_config(configlib.mesh('fsdp_tensor'))
  shardings = state_lib.abstract_and_shardings(init, mesh, rules)[1]
  spec = lambda v: v.get_value().spec
  attn, adapters = shardings.params['base']['blocks'][0]['attn'], shardings.params['lora']
  assert spec(attn['q']) == P('fsdp', 'tensor', None)
  assert spec(adapters['blocks'][0]['attn']['q']['lora_a']) == P('fsdp', None)
  assert spec(adapters['blocks'][0]['attn']['q']['lora_b']) == P(None, 'tensor', None)
  assert spec(adapters['blocks'][0]['attn']['o']['lora_a']) == P('tensor', None, None)
  assert spec(adapters['blocks'][1]['mlp']['down']['lora_b']) == P(None, 'fsdp')
  # Adam's moments exist for the adapters only, and follow them.
  adam = shardings.opt_state.inner_states['train'].inner_state[1][0]
  assert spec(adam.mu['lora']['blocks'][0]['attn']['q']['lora_a']) == P('fsdp', None)
  assert not jax.tree.leaves(adam.mu['base'])


CFG = lora.LoraConfig(rank=4, alpha=8.0)


def test_zero_b_leaves_the_model_unchanged_exactly():
  graphdef, params = plain_params()
  tokens = {'inputs': lm_batch()['inputs']}
  reference = logits_fn(None)(params, tokens)
  # B = 0 makes the adapters' term exactly 0, and w + 0 == w: the same arithmetic on the same
  # values as without adapters, bit for bit.
  np.testing.assert_array_equal(logits_fn(CFG)(with_adapters(CFG, 2), tokens), reference)


def _random_b(params_with_lora):
  """Non-zero B factors, as after training."""
  def fill(path, var):
    if optim.param_path(path).endswith('lora_b'):
      noise = np.random.default_rng(len(path)).normal(size=var.get_value().shape)
      return var.replace(jnp.asarray(0.1 * noise, jnp.float32))
    return var
  return jax.tree_util.tree_map_with_path(
      fill, params_with_lora, is_leaf=lambda x: isinstance(x, nnx.Variable))


def merge_tolerance(w, a, b, scale):
  """How far a float32 merge w + scale * (a @ b), less w, may be from the exact low-rank
  delta: each side's rank-term sum, and the rounding of w + delta (half an ulp of it)."""
  delta = scale * np.tensordot(np.abs(a), np.abs(b), 1)
  return tolerances.sum_tolerance(a.shape[-1] + 1, delta) + tolerances.EPS32 * (np.abs(w) + delta)


def test_merged_kernels_equal_the_unmerged_low_rank_path():
  """x W' == x W + (alpha / r) (x A) B for every adapted kernel, as Hu et al. compute it."""
  graphdef, params = plain_params()
  with_lora = _random_b(with_adapters(CFG, 3))
  exported = jax.jit(lambda p: lora.merge(p, CFG))(with_lora)
  merged, base, adapters = (flat(t) for t in (exported, params, with_lora['lora']))
  checked = 0
  for path, w in base.items():
    if f'{path}/lora_a' not in adapters:
      np.testing.assert_array_equal(merged[path], w)  # not adapted: copied
      continue
    a, b = adapters[f'{path}/lora_a'], adapters[f'{path}/lora_b']
    n_in = a.ndim - 1
    x = np.random.default_rng(checked).normal(size=(5, *w.shape[:n_in])).astype(np.float32)
    unmerged = np.tensordot(x, w, n_in) + CFG.scale * np.tensordot(np.tensordot(x, a, n_in), b, 1)
    # Per output, float32 on both sides: sums over the inputs and the rank of terms whose
    # absolute values add up to |x| (|w| + scale |a| |b|); the merged kernel's own rounding
    # (half an ulp) counts as one more term.
    n = int(np.prod(w.shape[:n_in])) + a.shape[-1] + 1
    magnitude = np.tensordot(np.abs(x), np.abs(w) + CFG.scale * np.tensordot(
        np.abs(a), np.abs(b), 1), n_in)
    tolerances.assert_close(np.tensordot(x, merged[path], n_in), unmerged,
                            tolerances.sum_tolerance(n, magnitude), err_msg=path)
    checked += 1
  assert checked == 7 * MODEL.num_layers
  # The model built from the exported (merged) parameters == the step's view of the adapters.
  tokens = {'inputs': lm_batch()['inputs']}
  exported_logits = logits_fn(None)(exported, tokens)
  # Two programs: one merges inside the forward pass, the other is handed merged kernels
  # (each rounded once, the rank-term sum). Their float sums may differ in order all along the
  # path, relative to the largest logit.
  terms = tolerances.forward_terms(MODEL, tokens['inputs'].shape[1]) + CFG.rank + 1
  tol = tolerances.sum_tolerance(terms, np.max(np.abs(exported_logits)))
  np.testing.assert_allclose(logits_fn(CFG)(with_lora, tokens), exported_logits, rtol=0,
                             atol=tol)
  assert not np.allclose(exported_logits, logits_fn(None)(params, tokens), rtol=0, atol=tol)
  assert set(flat(with_lora)) == {f'base/{k}' for k in base} | {f'lora/{k}' for k in adapters}


def test_rank_dropout_drops_whole_components():
  _, params = plain_params()
  cfg = lora.LoraConfig(rank=4, dropout=0.5, targets=(r'blocks/0/attn/q',))
  with_lora = _random_b(with_adapters(cfg, 4))
  adapter = with_lora['lora']['blocks'][0]['attn']['q']
  a, b = adapter['lora_a'].get_value(), adapter['lora_b'].get_value()
  w = params['blocks'][0]['attn']['q'].get_value()
  delta_of = jax.jit(
      lambda p, key: lora.merge(p, cfg, key)['blocks'][0]['attn']['q'].get_value() - w)
  # No key (evaluation, export): deterministic, nothing dropped.
  tolerances.assert_close(delta_of(with_lora, None), cfg.scale * np.tensordot(a, b, 1),
                          merge_tolerance(w, a, b, cfg.scale))
  masks = set()
  for seed in range(8):
    delta = delta_of(with_lora, jax.random.key(seed))
    # The delta is A diag(keep / (1 - p)) B for one of the 2^r keep masks.
    # A kept component is scaled by 1 / (1 - p) = 2. One mask fits within rounding; another
    # misses by a whole component (asserted: exactly one fits).
    fits = [m for m in itertools.product((0.0, 1.0), repeat=4)
            if np.all(np.abs(delta - cfg.scale * np.tensordot(a * np.array(m) / 0.5, b, 1))
                      <= merge_tolerance(w, a, b, cfg.scale / 0.5))]
    assert len(fits) == 1, seed
    masks.add(fits[0])
  assert len(masks) > 1  # the mask changes with the key


def test_lora_training_moves_only_adapters_and_trainable_params():
  # The LM head trains as a classifier head would; the blocks only through their adapters.
  cfg = lora.LoraConfig(rank=4, trainable=('final_norm/scale', 'lm_head'), dropout=0.1)
  _, tx, start, state, history = train(20, optim_config(weight_decay=0.0), cfg)
  assert history[-1] < 0.5 * history[0], history
  before, after = flat(start.params), flat(state.params)
  for path, value in before.items():
    moved = not np.array_equal(after[path], value)  # a frozen entry is never written at all
    should_move = path.startswith('lora/') or path in ('base/final_norm/scale', 'base/lm_head')
    assert moved == should_move, path
  # No optimizer memory for the frozen base: Adam's moments cover the trainable entries only.
  trainable, total = lora.count_trainable(
      state.params, optim.trainable_mask(state.params, frozen=lora.is_frozen(cfg)))
  moments = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert moments == 2 * 4 * trainable < total


def test_optim_freeze_patterns_through_the_step():
  config = optim_config(freeze=('embedding', 'blocks/0/.*'))
  _, _, start, state, history = train(3, config)
  before, after = flat(start.params), flat(state.params)
  frozen_bytes = 0
  for path, value in before.items():
    frozen = path == 'embedding' or path.startswith('blocks/0/')
    assert np.array_equal(after[path], value) == frozen, path  # frozen: never written
    frozen_bytes += value.nbytes if frozen else 0
  trainable_bytes = sum(v.nbytes for v in before.values()) - frozen_bytes
  moments = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert moments == 2 * trainable_bytes
  assert history[-1] < history[0]


def test_trainable_and_total_counts_by_hand():
  _, params = plain_params()
  cfg = lora.LoraConfig(rank=4, targets=(r'.*attn/q', r'.*mlp/down'),
                        trainable=('final_norm/scale',))
  with_lora = lora.add_adapters(params, cfg, jax.random.key(5))
  c, r = MODEL, cfg.rank
  d, n, k, h, f, v = (c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim,
                      c.vocab_size)
  per_block = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f + 2 * d  # q, k+v, o, mlp, norms
  base = 2 * v * d + c.num_layers * per_block + d  # embedding, lm_head, blocks, final norm
  adapters = c.num_layers * ((d * r + r * n * h) + (f * r + r * d))  # q: D->NH, down: F->D
  mask = optim.trainable_mask(with_lora, frozen=lora.is_frozen(cfg))
  assert lora.count_trainable(with_lora, mask) == (adapters + d, base + adapters)
  abstract = jax.eval_shape(lambda: with_lora)
  assert lora.count_trainable(abstract, mask) == (adapters + d, base + adapters)


def test_errors_name_the_field():
  _, params = plain_params()
  with pytest.raises(ValueError, match='config.peft.targets'):
    lora.add_adapters(params, lora.LoraConfig(targets=('.*attention/q',)), jax.random.key(0))
  with pytest.raises(ValueError, match='config.peft.trainable'):
    lora.add_adapters(params, lora.LoraConfig(trainable=('classifer.*',)), jax.random.key(0))
  with pytest.raises(ValueError, match='config.peft.rank'):
    lora.LoraConfig(rank=0)
  with pytest.raises(ValueError, match='config.peft.dropout'):
    lora.LoraConfig(dropout=1.0)
  with pytest.raises(ValueError, match='config.peft.method'):
    lora.from_config(ml_collections.ConfigDict({'method': 'adapter'}))
  with pytest.raises(ValueError, match='not a LoRA parameter tree'):
    lora.merge(params, lora.LoraConfig())


def test_from_config():
  peft = ml_collections.ConfigDict(dict(method='lora', rank=2, alpha=4, dropout=0.0,
                                        targets='.*attn/q', trainable=('.*classifier.*',)))
  cfg = lora.from_config(peft)
  assert cfg == lora.LoraConfig(rank=2, alpha=4.0, targets=('.*attn/q',),
                                trainable=('.*classifier.*',))
  assert cfg.scale == 2.0
  assert lora.from_config(ml_collections.ConfigDict({'method': 'none'})) is None

"""Structured pruning (prune/structured.py): the sliced model is the masked model, made smaller.

Two random tiny models: a llama with GQA (N=4 query heads in K=2 groups) and SwiGLU, and a
BERT classifier (MHA, biases on every projection, a pooler). Their parameters are perturbed
so that the biases (zero at init) and norm gains take part. Each is pruned by a plan from its
own weight-magnitude scores; masked and sliced models are built by the repo's own classes
(`nnx.merge` of their graphdefs), and a sliced model goes to transformers through hf.export.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances
from flax import nnx

from llmopt_jax import hf, sharding
from llmopt_jax.models import families, stats
from llmopt_jax.models.config import TransformerConfig, get_preset
from llmopt_jax.models.heads import SequenceClassifier
from llmopt_jax.models.transformer import Transformer
from llmopt_jax.prune import structured

TINY = get_preset('tiny')  # llama: D=64, N=4, K=2, H=16, F=192, SwiGLU, tied embeddings
BERT = TINY.replace(family='bert', num_kv_heads=4, mlp_dim=256, max_positions=32,
                    type_vocab_size=2, lm_head=False)
B, T = 2, 12
LENGTHS = (12, 7)  # right padding: row i holds LENGTHS[i] real tokens


@dataclasses.dataclass(frozen=True)
class Case:
  config: TransformerConfig
  labels: int | None  # a SequenceClassifier with this many labels; None: a Transformer
  heads_fraction: float
  neurons_fraction: float


CASES = {
    'llama_gqa': Case(TINY, None, 0.5, 0.5),  # 1 of 2 groups (2 of 4 heads), 96 of 192 neurons
    'bert_classifier': Case(BERT, 3, 0.25, 0.5),  # 1 of 4 heads, 128 of 256 neurons
}

# Where the units of each block parameter lie, written out from the model's layout (the module
# reads them from the logical axes): (axis, 'heads' | 'groups' | 'neurons').
UNIT_AXES = {
    ('attn', 'q'): (1, 'heads'), ('attn', 'q_bias', 'bias'): (0, 'heads'),
    ('attn', 'k'): (1, 'groups'), ('attn', 'k_bias', 'bias'): (0, 'groups'),
    ('attn', 'v'): (1, 'groups'), ('attn', 'v_bias', 'bias'): (0, 'groups'),
    ('attn', 'o'): (0, 'heads'),
    ('mlp', 'gate'): (1, 'neurons'), ('mlp', 'up'): (1, 'neurons'),
    ('mlp', 'up_bias', 'bias'): (0, 'neurons'), ('mlp', 'down'): (0, 'neurons'),
}


def _build(config: TransformerConfig, labels: int | None, seed: int = 0) -> nnx.Module:
  if labels is None:
    return Transformer(config, rngs=nnx.Rngs(seed))
  return SequenceClassifier(config, labels, rngs=nnx.Rngs(seed))


def _graphdef(config: TransformerConfig, labels: int | None) -> nnx.GraphDef:
  return nnx.split(nnx.eval_shape(lambda: _build(config, labels)), nnx.Param)[0]


def _perturbed(params: nnx.State, seed: int = 1) -> nnx.State:
  """Every parameter plus N(0, 0.05^2) noise (drawn on the host: no compilation)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(x + 0.05 * rng.standard_normal(x.shape, np.float32), x.dtype),
      params)


@functools.cache
def _random_params(name: str) -> nnx.State:
  """A case's parameters: perturbed zeros, and perturbed ones for the norm gains, so that the
  biases take part (they are 0 at init). Initialising through the model instead would cost
  seconds of compilation for values that are as random."""
  case = CASES[name]
  abstract = nnx.state(nnx.eval_shape(lambda: _build(case.config, case.labels)), nnx.Param)
  base = [(path, var.replace(jnp.full(var.shape, path[-1] == 'scale', var.dtype)))
          for path, var in nnx.to_flat_state(abstract)]
  return _perturbed(nnx.from_flat_state(base))


def _batch(vocab: int) -> dict[str, jax.Array]:
  mask = (np.arange(T)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
  tokens = np.random.default_rng(0).integers(1, vocab, (B, T)) * mask
  return {'tokens': jnp.asarray(tokens), 'padding_mask': jnp.asarray(mask)}


@functools.partial(jax.jit, static_argnums=0)
def _outputs(graphdef: nnx.GraphDef, params: nnx.State,
             batch: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
  """The final hidden states [B,T,D], then the logits of a model that has them: a decoder's
  over the vocabulary [B,T,V], a classifier's over its labels [B,L]."""
  model = nnx.merge(graphdef, params)
  if isinstance(model, SequenceClassifier):
    return model.backbone.encode(**batch), model(**batch)
  hidden = model.encode(**batch)
  return (hidden, model.logits(hidden)) if model.config.lm_head else (hidden,)


def _plan_of(name: str, params: nnx.State, **fractions: float) -> structured.Plan:
  case = CASES[name]
  fractions = {'heads_fraction': case.heads_fraction,
               'neurons_fraction': case.neurons_fraction} | fractions
  return structured.plan(structured.group_scores(params, case.config),
                         structured.neuron_scores(params, case.config), **fractions)


@pytest.fixture(scope='module', params=sorted(CASES))
def pruned(request):
  """(name, params, plan, masked params, sliced config, sliced params) of one case."""
  name = request.param
  params = _random_params(name)
  plan = _plan_of(name, params)
  small, sliced = structured.slice_model(params, CASES[name].config, plan)
  return name, params, plan, structured.mask(params, CASES[name].config, plan), small, sliced


def _forward_tolerance(config: TransformerConfig, outputs: jax.Array) -> float:
  """Masked and sliced models add the same float32 terms but for exact zeros, which change
  no sum; a narrower matrix may still be tiled, and so summed, in another order. That is a
  reassociation, bounded along the masked model's path as tests/tolerances.py derives."""
  return tolerances.sum_tolerance(tolerances.forward_terms(config, T),
                                  float(np.max(np.abs(outputs))))


def test_sliced_model_computes_what_the_masked_one_does(pruned):
  name, params, _, masked, small, sliced = pruned
  case = CASES[name]
  batch = _batch(case.config.vocab_size)
  want = _outputs(_graphdef(case.config, case.labels), masked, batch)
  got = _outputs(_graphdef(small, case.labels), sliced, batch)
  real = np.asarray(batch['padding_mask']) > 0  # outputs at padding positions mean nothing
  for what, g, w in zip(('hidden', 'logits'), got, want, strict=True):
    g, w = (np.asarray(g)[real], np.asarray(w)[real]) if w.ndim == 3 else (g, w)
    tolerances.assert_close(g, w, _forward_tolerance(case.config, w), err_msg=f'{name} {what}')
  # Sanity: the units removed mattered, the masked model is another function.
  unpruned = _outputs(_graphdef(case.config, case.labels), params, batch)[1]
  assert np.max(np.abs(unpruned - want[1])) > 100 * _forward_tolerance(case.config, want[1])


def _removed_count(config: TransformerConfig, plan: structured.Plan) -> int:
  """Parameters a plan removes, in closed form: per group its k, v slices [D,H] and its G
  heads' q, o slices [D,H] (+ the biases [H] of each), per neuron a column of up (and gate)
  and a row of down [D] (+ its up_bias)."""
  c, family = config, families.get(config.family)
  g, d, h = c.num_heads // c.num_kv_heads, c.embed_dim, c.head_dim
  qkv_bias = family.bias or c.attention_bias
  per_group = 2 * d * h + 2 * g * d * h + (g + 2) * h * qkv_bias
  per_neuron = (3 if family.gated_mlp else 2) * d + family.bias
  groups = c.num_kv_heads - len(plan.kept_groups[0])
  neurons = c.mlp_dim - len(plan.kept_neurons[0])
  return c.num_layers * (groups * per_group + neurons * per_neuron)


def _count(params: nnx.State) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def test_sliced_model_has_the_expected_size_and_config(pruned):
  name, params, plan, _, small, sliced = pruned
  c = CASES[name].config
  groups, neurons = len(plan.kept_groups[0]), len(plan.kept_neurons[0])
  assert groups == c.num_kv_heads - round(CASES[name].heads_fraction * c.num_kv_heads)
  assert neurons == c.mlp_dim - round(CASES[name].neurons_fraction * c.mlp_dim)
  g = c.num_heads // c.num_kv_heads
  assert small == c.replace(num_heads=groups * g, num_kv_heads=groups, mlp_dim=neurons)
  assert _count(sliced) == _count(params) - _removed_count(c, plan)
  backbone = sliced['backbone'] if CASES[name].labels else sliced
  assert _count(backbone) == stats.count_params(small)
  # Every array has the shape of the smaller model and keeps its logical axes.
  fresh = nnx.to_flat_state(nnx.state(nnx.eval_shape(lambda: _build(small, CASES[name].labels)),
                                      nnx.Param))
  original = dict(nnx.to_flat_state(params))
  got = nnx.to_flat_state(sliced)
  assert [p for p, _ in got] == [p for p, _ in fresh]
  for (path, var), (_, want) in zip(got, fresh, strict=True):
    assert var.get_value().shape == want.get_value().shape, path
    assert sharding.param_axes(var) == sharding.param_axes(original[path]), path


def _kept_along(kind: str, plan: structured.Plan, block: int, config: TransformerConfig):
  if kind == 'neurons':
    return list(plan.kept_neurons[block])
  g = config.num_heads // config.num_kv_heads
  groups = plan.kept_groups[block]
  return list(groups) if kind == 'groups' else [k * g + j for k in groups for j in range(g)]


def test_mask_zeroes_the_removed_units_and_slice_keeps_the_rest(pruned):
  name, params, plan, masked, _, sliced = pruned
  c = CASES[name].config
  sliced, masked = dict(nnx.to_flat_state(sliced)), dict(nnx.to_flat_state(masked))
  seen = set()
  for path, var in nnx.to_flat_state(params):
    value = np.asarray(var.get_value())
    inner = path[path.index('blocks') + 2:] if 'blocks' in path else None
    if inner not in UNIT_AXES:  # embeddings, norms, o_bias, down_bias, heads: untouched
      np.testing.assert_array_equal(masked[path].get_value(), value, err_msg=str(path))
      np.testing.assert_array_equal(sliced[path].get_value(), value, err_msg=str(path))
      continue
    seen.add(inner)
    axis, kind = UNIT_AXES[inner]
    kept = _kept_along(kind, plan, path[path.index('blocks') + 1], c)
    removed = sorted(set(range(value.shape[axis])) - set(kept))
    m = np.asarray(masked[path].get_value())
    assert removed and not np.any(np.take(m, removed, axis=axis)), path
    np.testing.assert_array_equal(np.take(m, kept, axis=axis), np.take(value, kept, axis=axis))
    np.testing.assert_array_equal(sliced[path].get_value(), np.take(value, kept, axis=axis))
  family = families.get(c.family)
  expected = {p for p in UNIT_AXES if (p[-1] != 'bias' or family.bias)
              and (p != ('mlp', 'gate') or family.gated_mlp)}
  assert seen == expected


@pytest.mark.parametrize('name', sorted(CASES))
def test_pruning_nothing_changes_nothing(name):
  params, c = _random_params(name), CASES[name].config
  plan = _plan_of(name, params, heads_fraction=0.0, neurons_fraction=0.0)
  small, sliced = structured.slice_model(params, c, plan)
  assert small == c
  for other in (structured.mask(params, c, plan), sliced):
    jax.tree.map(np.testing.assert_array_equal, other, params)


@pytest.mark.parametrize('fraction, count', [(0.5, 4), (0.5, 5), (0.3, 7), (0.25, 2), (0.0, 3)])
def test_plan_removes_round_f_count_lowest_units(fraction, count):
  rng = np.random.default_rng(count)
  # Three blocks of scores with ties (integers from a small range).
  scores = [rng.integers(0, 3, count).astype(np.float32) for _ in range(3)]
  plan = structured.plan(scores, scores, heads_fraction=fraction, neurons_fraction=fraction)
  for block, s in enumerate(scores):
    kept = plan.kept_groups[block]
    assert plan.kept_neurons[block] == kept and list(kept) == sorted(kept)
    removed = sorted(set(range(count)) - set(kept))
    assert len(removed) == round(fraction * count)  # Python's round: 2.5 -> 2
    # The highest scores stay; among equal scores the lower index goes first.
    rank = {i: (s[i], i) for i in range(count)}
    assert all(rank[r] < rank[k] for r in removed for k in kept)


@pytest.mark.parametrize('fractions, message', [
    ({'heads_fraction': 0.9},
     r'config\.prune\.heads_fraction=0\.9 would remove every attention head of a block'),
    ({'neurons_fraction': 0.95},
     r'config\.prune\.neurons_fraction=0\.95 would remove every MLP neuron of a block'),
    ({'heads_fraction': 1.0}, r'config\.prune\.heads_fraction=1\.0; must lie in \[0, 1\)'),
    ({'neurons_fraction': -0.1}, r'config\.prune\.neurons_fraction=-0\.1; must lie in'),
    ({'heads_fraction': float('nan')}, r'config\.prune\.heads_fraction=nan; must lie in'),
])
def test_plan_refuses_fractions_that_leave_nothing_or_lie_outside(fractions, message):
  groups, neurons = [np.arange(2.0)] * 2, [np.arange(4.0)] * 2  # 2 blocks, K=2, F=4
  fractions = {'heads_fraction': 0.0, 'neurons_fraction': 0.0} | fractions
  with pytest.raises(ValueError, match=message) as error:
    structured.plan(groups, neurons, **fractions)
  assert '\n' not in str(error.value)


def _hf_tolerance(config: TransformerConfig) -> float:
  """Relative bound between transformers and us on one forward pass: each rounds along the
  path (tests/tolerances.py); exp, erf and rsqrt differ by an ulp or two, a term each."""
  return tolerances.sum_tolerance(tolerances.forward_terms(config, T) + T, 1.0)


@pytest.mark.parametrize('name, heads_fraction', [
    ('llama', 0.5),  # LlamaForCausalLM takes head_dim * num_heads != hidden_size
    ('bert', 0.0),  # neurons only: BertModel's intermediate_size is free
    pytest.param('bert', 0.5, marks=pytest.mark.xfail(
        strict=True, raises=ValueError,
        reason='transformers 5 BertModel derives the head size as hidden_size / '
               'num_attention_heads and has no pruned_heads, so a BERT without some heads has '
               'no HF form: hf/configs._mha_only refuses head_dim * num_heads != embed_dim')),
])
def test_sliced_model_round_trips_through_transformers(name, heads_fraction, request, tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  if name == 'llama':
    config, params = TINY, _random_params('llama_gqa')
  else:  # conftest's random BertModel, loaded as a stage loads a checkpoint
    model, config = hf.load_pretrained(request.getfixturevalue('tiny_bert_dir'))
    params = _perturbed(nnx.state(model, nnx.Param))
  plan = structured.plan(structured.group_scores(params, config),
                         structured.neuron_scores(params, config),
                         heads_fraction=heads_fraction, neurons_fraction=0.5)
  small, sliced = structured.slice_model(params, config, plan)
  hf.export(sliced, small, str(tmp_path))
  auto = transformers.AutoModel if name == 'bert' else transformers.AutoModelForCausalLM
  theirs = auto.from_pretrained(tmp_path).eval()
  batch = _batch(small.vocab_size)
  with torch.no_grad():
    out = theirs(input_ids=torch.tensor(np.asarray(batch['tokens'])),
                 attention_mask=torch.tensor(np.asarray(batch['padding_mask'])))
  ours = _outputs(_graphdef(small, None), sliced, batch)[-1]
  want = out.last_hidden_state if name == 'bert' else out.logits
  real = np.asarray(batch['padding_mask']) > 0
  ours, want = np.asarray(ours)[real], want.numpy()[real]
  assert np.max(np.abs(ours - want)) / np.max(np.abs(want)) < _hf_tolerance(small)

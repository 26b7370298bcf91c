"""The fine-tune stage end to end: all-MiniLM-L6-v2 on Banking77, fully and with LoRA."""

import jax
import numpy as np
from flax import nnx

from conftest import load_config, restore_state
from llmopt_jax import hf
from llmopt_jax.stages import finetune


def test_tiny_banking77_finetune_beats_the_majority_class(tmp_path):
  """30 steps already put test accuracy far above always answering the commonest intent."""
  config = load_config('finetune', 'tiny')
  summary = finetune.run(config, str(tmp_path))
  report = summary['test']
  majority = max(report['support'].values()) / report['num_examples']
  assert report['num_examples'] == 8 * config.train.batch_size
  assert report['accuracy'] > max(5 * majority, 0.15), (report['accuracy'], majority)
  assert 0.0 < report['macro_f1'] <= 1.0
  assert report['trainable_params'] == report['total_params']
  assert (tmp_path / 'report.md').exists() and (tmp_path / 'report.json').exists()


def _flat(tree) -> dict[str, np.ndarray]:
  """'/'-joined parameter paths -> arrays, whether list indices are ints or strings and
  whether a checkpoint kept the variables' `value` field in the path."""
  def name(key):
    return str(getattr(key, 'key', getattr(key, 'idx', getattr(key, 'name', key))))
  flat = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    flat['/'.join(name(k) for k in path).removesuffix('/value')] = np.asarray(leaf)
  return flat


def test_lora_finetune_trains_adapters_and_head_only(tmp_path):
  """Under LoRA the pretrained weights stay bitwise what the checkpoint file holds."""
  config = load_config('finetune', 'tiny,peft=lora')
  config.train.update(num_steps=4, eval_every=4)
  config.checkpoint.every_steps = 4
  summary = finetune.run(config, str(tmp_path))
  assert summary['test']['trainable_params'] < 0.1 * summary['test']['total_params']

  state = restore_state(tmp_path, 4)
  model, _ = hf.load_pretrained(hf.minilm_path())
  pretrained = _flat(nnx.to_pure_dict(nnx.state(model)))
  trained = _flat(state['params']['base']['backbone'])
  shared = set(pretrained) & set(trained)
  assert len(shared) > 50  # every backbone tensor of the 6-layer encoder
  for path in shared:
    np.testing.assert_array_equal(trained[path], pretrained[path], err_msg=str(path))
  adapters = jax.tree.leaves(state['params']['lora'])
  assert adapters and any(np.abs(a).max() > 0 for a in adapters)

"""Test setup: eight simulated CPU devices, so sharded code runs on every test run, and XLA
compiling for a suite of tiny models."""

import os

# Must be set before JAX initialises its backends, i.e. before any test imports jax.
# The suite's models are tiny, so compiling them costs more than running them. XLA:CPU's
# expensive LLVM passes (loop unrolling, vectorisation of the fused elementwise code) are
# switched off: the same HLO programs, compiled sooner; matmuls still run in their libraries.
# Measured (experiments/results/test_suite_time.md): a tiny pretrain killed and resumed, 106 s
# -> 72 s; a MiniLM fine-tune, dominated by its matmuls, unchanged (103 s). Level 0 of
# --xla_backend_optimization_level compiles as fast but made the fine-tune 60% slower.
# A main.py subprocess inherits this environment, so it is compiled the same way.
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8',
     '--xla_llvm_disable_expensive_passes=true']).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# One persistent XLA compilation cache per test session, shared by the xdist workers (they
# inherit the controller's environment) and every main.py subprocess: the same tiny models
# are compiled by many tests, and a cache hit skips the compile. Removed at the end.
if 'PYTEST_XDIST_WORKER' not in os.environ and 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import atexit  # noqa: E402
  import shutil  # noqa: E402
  import tempfile  # noqa: E402
  _CACHE = tempfile.mkdtemp(prefix='llmopt_jax_xla_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'  # every program
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import importlib.util  # noqa: E402  (after the environment above is fixed)

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None):
  """`get_config(arg)` of configs/<name>.py, as main.py's --config=configs/<name>.py:arg."""
  spec = importlib.util.spec_from_file_location(
      f'configs_{name}', os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory) -> str:
  """One TFDS data dir per test session, so shipped sets are prepared once, never in $HOME."""
  return str(tmp_path_factory.mktemp('tfds'))


def restore_state(workdir, step: int) -> dict:
  """The `state` item of checkpoint `step`, on this process's first device, whatever mesh or
  number of processes wrote it."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(str(workdir), 'checkpoints', str(step), 'state')
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        checkpointer.metadata(path).item_metadata)
  return checkpointer.restore(path, target)


@pytest.fixture(scope='session')
def pretrain_workdir(tfds_dir, tmp_path_factory) -> str:
  """A finished `configs/pretrain.py:tiny` run (byte tokenizer), for stages that start from
  one; made once per test session (per xdist worker)."""
  from llmopt_jax.stages import pretrain
  config = load_config('pretrain', 'tiny')
  config.data.tfds_data_dir = tfds_dir
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  pretrain.run(config, workdir)
  return workdir


def load_finished(workdir):
  """(graphdef, params) of a finished run's best checkpoint on the 8-device data-parallel
  mesh, loaded as a later stage loads it (`tasks.finished.load`)."""
  from llmopt_jax import configlib, sharding
  from llmopt_jax.tasks import finished
  mesh, rules = sharding.from_config(configlib.mesh('data'))
  model = finished.load(str(workdir), mesh, rules)
  return model.graphdef, model.params


def tiny_bert(directory: str) -> str:
  """A random 2-layer, 32-wide BERT with MiniLM's tokenizer as a Hugging Face directory: a
  stand-in for MiniLM where a test needs the classification chain but not MiniLM's weights,
  whose compilation (and teacher passes over Banking77) would take minutes on a CPU."""
  import json
  import jax
  from flax import nnx
  from llmopt_jax import hf
  from llmopt_jax.hf import configs as hf_configs
  from llmopt_jax.models.transformer import Transformer
  with open(os.path.join(hf.minilm_path(), 'config.json'), encoding='utf-8') as f:
    config = hf_configs.config_from_hf(json.load(f)).replace(
        num_layers=2, embed_dim=32, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64,
        max_positions=32)
  build = lambda: Transformer(config, rngs=nnx.Rngs(0))
  params = jax.jit(lambda: nnx.state(build(), nnx.Param))()
  return hf.export(params, config, directory, tokenizer_dir=hf.minilm_path())


@pytest.fixture(scope='session')
def tiny_bert_dir(tmp_path_factory) -> str:
  """`tiny_bert`, made once per test session (per xdist worker)."""
  return tiny_bert(str(tmp_path_factory.mktemp('tiny_bert')))


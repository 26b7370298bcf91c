"""Test setup: eight simulated CPU devices, so sharded code runs on every test run."""

import os

# Must be set before JAX initialises its backends, i.e. before any test imports jax.
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8']).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

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

"""Test setup: eight simulated CPU devices, so sharded code runs on every test run."""

import os

# Must be set before JAX initialises its backends, i.e. before any test imports jax.
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8']).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

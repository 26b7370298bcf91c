"""What the machine can do: a measured matmul peak, datasheet peaks, and a timing helper.

MFU is model FLOP/s over a peak. A datasheet number exists only for accelerators, and even
there it is a ceiling nobody reaches; on a CPU it does not exist at all (the figure depends on
the core count, the vector units and the BLAS XLA links). So besides the datasheet we measure
the peak the way the model spends its FLOPs: a large square matmul, on the same devices.

  python -c "from llmopt_jax import perf; print(f'{perf.measure_matmul_peak():.3g} FLOP/s')"
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Big enough that a matmul is compute-bound (n^3 work over n^2 memory) and outlasts the
# dispatch overhead by orders of magnitude, small enough to take a second or two.
_DEFAULT_SIZE = {'cpu': 2048}
_ACCELERATOR_SIZE = 8192

# Dense (no 2:4 sparsity) bf16 FLOP/s per chip, from the vendors' datasheets. Matched as
# substrings of the lower-cased `device_kind`, in order, so the specific names come first
# ('tpu v5 lite' is v5e, while a bare 'tpu v5' is v5p; an H100 PCIe is slower than an SXM).
_DATASHEET_BF16: tuple[tuple[str, float], ...] = (
    ('h100 pcie', 756e12),
    ('h100', 989e12),
    ('h200', 989e12),
    ('a100', 312e12),
    ('tpu v4', 275e12),
    ('tpu v5 lite', 197e12),
    ('tpu v5e', 197e12),
    ('tpu v5p', 459e12),
    ('tpu v5', 459e12),
    ('tpu v6 lite', 918e12),
    ('tpu v6e', 918e12),
)


def datasheet_peak(device: Any) -> float | None:
  """Dense bf16 peak FLOP/s of one `device` (anything with `device_kind`); None if unknown.

  CPUs get None: their peak is not a catalogue number, so MFU on a CPU uses the measured one.
  """
  if getattr(device, 'platform', None) == 'cpu':
    return None
  kind = ' '.join(str(getattr(device, 'device_kind', '')).lower().split())
  for name, peak in _DATASHEET_BF16:
    if name in kind:
      return peak
  return None


def time_fn(fn: Callable[..., Any], *args: Any, warmup: int = 1, repeats: int = 5,
            number: int = 1, stat: Callable[[list[float]], float] = statistics.median) -> float:
  """Seconds per call of `fn(*args)`: `stat` over `repeats` samples of `number` calls each.

  Every sample blocks on the last output, so it measures the device's work and not just the
  asynchronous dispatch. `warmup` calls first pay for compilation and allocation. Calls within
  a sample are queued back to back, which hides the per-call host overhead of short kernels.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(number):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / number)
  return stat(samples)


def measure_matmul_peak(dtype: Any = None, size: int | None = None, repeats: int = 5,
                        devices: Sequence[jax.Device] | None = None) -> float:
  """FLOP/s of square `size` x `size` matmuls, one per device, run together on `devices`.

  Defaults: the first device; float32 on CPU (what the model computes in there, and bf16 is
  emulated on most CPUs) and bfloat16 on accelerators (what their peak is quoted for); a size
  per backend. Passing all the mesh's devices gives their aggregate peak, which stays right
  where devices share hardware: CPU devices forced by `--xla_force_host_platform_device_count`
  split the same cores, so eight of them do not make eight times the FLOPs.

  We keep the best of `repeats`: interference (other processes, clock ramp-up) only ever
  slows a run down, so the fastest sample is the closest to what the hardware can do.
  """
  devices = list(devices or jax.devices()[:1])
  platform = devices[0].platform
  on_cpu = platform == 'cpu'
  size = size or _DEFAULT_SIZE.get(platform, _ACCELERATOR_SIZE)
  dtype = dtype or (jnp.float32 if on_cpu else jnp.bfloat16)

  mesh = Mesh(np.asarray(devices), ('d',))
  split = NamedSharding(mesh, PartitionSpec('d'))
  shape = (len(devices), size, size)  # [devices, n, n]: one independent matmul per device

  # Random operands, made on the devices: GPUs clock higher on zeros and ones, which would
  # flatter the peak, and no host ever holds the (devices x n x n) arrays.
  @jax.jit
  def operands(key):
    a, b = jax.random.normal(key, (2, *shape), dtype)
    return jax.lax.with_sharding_constraint(a, split), jax.lax.with_sharding_constraint(b, split)

  matmul = jax.jit(lambda a, b: jnp.einsum('dij,djk->dik', a, b), out_shardings=split)
  a, b = operands(jax.random.key(0))
  number = 1 if on_cpu else 10  # accelerator matmuls are ~1 ms; amortise the dispatch
  seconds = time_fn(matmul, a, b, warmup=1, repeats=repeats, number=number, stat=min)
  return len(devices) * 2 * size**3 / seconds


def si(value: float, unit: str) -> str:
  """`value` with an SI prefix and three significant digits: si(2.21e11, 'FLOP/s') is
  '221 GFLOP/s'."""
  for scale, prefix in ((1e15, 'P'), (1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(value) >= scale:
      return f'{value / scale:.3g} {prefix}{unit}'
  return f'{value:.3g} {unit}'

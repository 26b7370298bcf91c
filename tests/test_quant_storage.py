"""Quantized weights on disk: int4 packing, save/load round trips, sizes read from the files,
atomic replacement, and clear errors for missing or unknown files.

Packing and the files move bits without arithmetic, so every comparison here is exact; the
dequantized values are the same float32 products of the same integers and scales."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import qwix
import safetensors
import safetensors.numpy
from qwix._src.core import qarray

from llmopt_jax.quant import storage


def _int8_per_channel(w):
  return qarray.quantize(w, qarray.HowToQuantize(qtype=jnp.int8, channelwise_axes=(1,)))


def _int4(w, tiled_axes=None, calibration_method='absmax'):
  how = qarray.HowToQuantize(qtype=jnp.int4, channelwise_axes=(1,), tiled_axes=tiled_axes or {},
                             calibration_method=calibration_method)
  return qarray.quantize(w, how)


@pytest.mark.parametrize('shape', [(1,), (7,), (8,), (3, 5), (2, 3, 4), (5, 1, 3)])
def test_pack_unpack_round_trip(shape):
  rng = np.random.default_rng(sum(shape))
  values = rng.integers(-8, 8, size=shape).astype(np.int8)
  values.reshape(-1)[:2] = [-8, 7][:values.size]  # the extremes, whatever the draw
  packed = storage.pack_int4(values)
  assert packed.dtype == np.uint8 and packed.shape == (-(-values.size // 2),)
  unpacked = storage.unpack_int4(packed, shape)
  assert unpacked.dtype == np.int8 and unpacked.shape == shape
  np.testing.assert_array_equal(unpacked, values)
  # Other integer dtypes, and ml_dtypes int4 as qwix holds it, pack to the same bytes.
  np.testing.assert_array_equal(storage.pack_int4(values.astype(np.int64)), packed)
  np.testing.assert_array_equal(storage.pack_int4(values.astype(ml_dtypes.int4)), packed)


def test_pack_layout_is_low_nibble_first():
  # -1 is 0b1111 and 2 is 0b0010: the first value takes the low nibble, an odd tail pads with 0.
  np.testing.assert_array_equal(storage.pack_int4(np.array([-1, 2, 3])), [0x2F, 0x03])


@pytest.mark.parametrize('bad', [8, -9, 255])
def test_pack_out_of_range_raises(bad):
  with pytest.raises(ValueError, match=r'\[-8, 7\]'):
    storage.pack_int4(np.array([0, bad, 1], np.int32))


def test_save_load_round_trip(tmp_path):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  w8 = jax.random.normal(k1, (64, 48))
  w4 = jax.random.normal(k2, (256, 40)) + 0.5  # an offset, so min/max zero points are non-zero
  q8 = _int8_per_channel(w8)
  q4 = _int4(w4, tiled_axes={0: 128}, calibration_method='minmax')
  assert q8.scale.shape == (1, 48) and q4.scale.shape == (2, 40)
  assert q4.zero_point is not None and q4.zero_point.shape == (2, 40)
  tensors = {
      'embed': np.asarray(jax.random.normal(k3, (10, 6))),
      'norm': jnp.linspace(-1, 1, 6, dtype=jnp.bfloat16),
      'layer.kernel8': q8,
      'layer.kernel4': q4,
  }
  metadata = {'model': 'tiny', 'rules': [{'pattern': '.*kernel', 'qtype': 'int4'}], 'bits': 4}
  size = storage.save(str(tmp_path / 'model'), tensors, metadata)
  assert size == storage.weight_bytes(str(tmp_path / 'model'))

  loaded, loaded_metadata = storage.load(str(tmp_path / 'model'))
  assert loaded_metadata == metadata
  assert sorted(loaded) == sorted(tensors)
  np.testing.assert_array_equal(loaded['embed'], tensors['embed'])
  assert loaded['norm'].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(loaded['norm'], np.asarray(tensors['norm']))
  for name in ('layer.kernel8', 'layer.kernel4'):
    want, got = tensors[name], loaded[name]
    assert isinstance(got, qwix.QArray)
    assert got.qtype == want.qtype and got.qvalue.dtype == want.qvalue.dtype
    np.testing.assert_array_equal(np.asarray(got.qvalue, np.int8),
                                  np.asarray(want.qvalue, np.int8))
    np.testing.assert_array_equal(got.scale, want.scale)
    assert (got.zero_point is None) == (want.zero_point is None)
    if want.zero_point is not None:
      assert got.zero_point.dtype == want.zero_point.dtype
      np.testing.assert_array_equal(np.asarray(got.zero_point, np.int8),
                                    np.asarray(want.zero_point, np.int8))
    np.testing.assert_array_equal(qwix.dequantize(got), qwix.dequantize(want))

  # On disk the int4 values really are packed bytes, not int8 in disguise.
  with safetensors.safe_open(str(tmp_path / 'model' / 'model.safetensors'), 'np') as f:
    stored = f.get_tensor('layer.kernel4.qvalue')
  assert stored.dtype == np.uint8 and stored.shape == (256 * 40 // 2,)


def test_file_sizes_shrink_as_the_bits_say(tmp_path):
  n = 1024
  w = jax.random.normal(jax.random.key(1), (n, n))
  plain = storage.save(str(tmp_path / 'f32'), {'w': w}, {})
  int8 = storage.save(str(tmp_path / 'int8'), {'w': _int8_per_channel(w)}, {})
  int4 = storage.save(str(tmp_path / 'int4'), {'w': _int4(w)}, {})
  # Payloads: float32 4 n^2 bytes; int8 n^2 + 4 n (one float32 scale per output channel);
  # int4 n^2 / 2 + 4 n. With n = 1024 the ideal ratios are 4 n / (n + 4) = 3.984 and
  # 8 n / (n + 8) = 7.938; each file also carries a header of a few hundred bytes.
  assert 3.9 <= plain / int8 <= 4.0
  assert 7.7 <= plain / int4 <= 8.0
  for size, payload in ((plain, 4 * n * n), (int8, n * n + 4 * n), (int4, n * n // 2 + 4 * n)):
    assert 0 < size - payload < 1024  # the rest is the safetensors header, nothing hidden


def test_failed_save_leaves_previous_model_intact(tmp_path, monkeypatch):
  path = str(tmp_path / 'model')
  first = {'w': np.arange(12, dtype=np.float32).reshape(3, 4)}
  storage.save(path, first, {'version': 1})

  real_save_file = safetensors.numpy.save_file

  def fail_midway(tensors, filename, metadata=None):
    with open(filename, 'wb') as f:
      f.write(b'half a file')
    raise OSError('disk full')

  monkeypatch.setattr(safetensors.numpy, 'save_file', fail_midway)
  with pytest.raises(OSError, match='disk full'):
    storage.save(path, {'w': np.zeros((3, 4), np.float32)}, {'version': 2})
  loaded, metadata = storage.load(path)
  assert metadata == {'version': 1}
  np.testing.assert_array_equal(loaded['w'], first['w'])
  assert os.listdir(tmp_path) == ['model']  # no temporary sibling left behind

  # A save that completes does replace the old model, again with nothing left beside it.
  monkeypatch.setattr(safetensors.numpy, 'save_file', real_save_file)
  storage.save(path, {'v': np.ones(2, np.int32)}, {'version': 3})
  loaded, metadata = storage.load(path)
  assert metadata == {'version': 3} and list(loaded) == ['v']
  assert os.listdir(tmp_path) == ['model']


def test_load_missing_directory_names_it(tmp_path):
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='nowhere'):
    storage.load(missing)
  with pytest.raises(FileNotFoundError, match='nowhere'):
    storage.weight_bytes(missing)


def test_load_unknown_format_names_file(tmp_path):
  path = str(tmp_path / 'model')
  storage.save(path, {'w': np.ones(3, np.float32)}, {})
  quant_json = os.path.join(path, 'quant.json')
  with open(quant_json) as f:
    manifest = json.load(f)
  manifest['format'] = 99
  with open(quant_json, 'w') as f:
    json.dump(manifest, f)
  with pytest.raises(ValueError, match='quant.json'):
    storage.load(path)

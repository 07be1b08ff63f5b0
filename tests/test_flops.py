"""The MFU peak is measured once per machine and cached; these tests check the cache, not timings."""
import json
import logging

import jax
import pytest

from ztt_jax import flops

FAKE_PEAK = 123.0e9


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """A private cache file and a fake measurement that counts its calls (no matmul is timed)."""
  path = tmp_path / "peak_flops.json"
  monkeypatch.setenv(flops.PEAK_CACHE_ENV, str(path))
  calls = []

  def fake_measure(device, dtype="float32", sizes=None, **kw):
    calls.append(dtype)
    return {"flops": FAKE_PEAK, "per_size": {"1024": FAKE_PEAK}}

  monkeypatch.setattr(flops, "measure_matmul_peak", fake_measure)
  return path, calls


def test_second_call_reads_the_cache(cache):
  path, calls = cache
  first = flops.measured_peak()
  assert calls == ["float32"] and not first["from_cache"]
  key = flops.peak_cache_key(jax.local_devices()[0], "float32")
  assert json.loads(path.read_text())[key]["flops"] == FAKE_PEAK
  second = flops.measured_peak()
  assert calls == ["float32"], "the cached peak must not be measured again"
  assert second["from_cache"] and second["flops"] == FAKE_PEAK


def test_dtype_is_part_of_the_key(cache):
  path, calls = cache
  flops.measured_peak(dtype="float32")
  flops.measured_peak(dtype="bfloat16")
  flops.measured_peak(dtype="bfloat16")
  assert calls == ["float32", "bfloat16"]
  assert len(json.loads(path.read_text())) == 2


def test_peak_flops_uses_the_cache_on_cpu(cache):
  _, calls = cache
  info = flops.peak_flops_info()
  n = len(jax.local_devices())
  # Fake CPU devices share the host's cores: the host peak is the total, split per device.
  assert info["total"] == FAKE_PEAK and info["per_device"] == pytest.approx(FAKE_PEAK / n)
  assert info["source"] == "measured"
  assert flops.peak_flops_info()["source"] == "cache" and calls == ["float32"]
  assert flops.peak_flops() == FAKE_PEAK


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"x": 3}'])
def test_corrupt_cache_is_remeasured_with_a_warning(cache, caplog, content):
  path, calls = cache
  path.write_text(content)
  with caplog.at_level(logging.WARNING, logger="ztt_jax.flops"):
    m = flops.measured_peak()
  assert calls == ["float32"] and m["flops"] == FAKE_PEAK
  assert any("peak-FLOPs cache" in r.getMessage() for r in caplog.records)
  flops.measured_peak()
  assert calls == ["float32"], "the rewritten cache must be valid"


def test_bad_entry_is_remeasured_with_a_warning(cache, caplog):
  path, calls = cache
  key = flops.peak_cache_key(jax.local_devices()[0], "float32")
  path.write_text(json.dumps({key: {"flops": -1.0}, "other/key": {"flops": 5.0}}))
  with caplog.at_level(logging.WARNING, logger="ztt_jax.flops"):
    m = flops.measured_peak()
  assert calls == ["float32"] and m["flops"] == FAKE_PEAK
  assert any("bad entry" in r.getMessage() for r in caplog.records)
  assert json.loads(path.read_text())["other/key"] == {"flops": 5.0}, "other machines' entries are kept"


def test_remeasure_overwrites(cache):
  _, calls = cache
  flops.measured_peak()
  flops.measured_peak(remeasure=True)
  assert calls == ["float32", "float32"]


def test_config_overrides_without_measuring(cache):
  _, calls = cache
  info = flops.peak_flops_info(configured_per_device=2e12)
  assert info["source"] == "config" and info["per_device"] == 2e12
  assert info["total"] == 2e12 * len(jax.local_devices())
  assert calls == []


def test_datasheet_table():
  assert flops.datasheet_peak("NVIDIA H200") == 989e12
  assert flops.datasheet_peak("TPU v5 lite") == 197e12
  assert flops.datasheet_peak("some new chip") is None


def test_real_measurement_is_positive():
  """The timing loop itself runs (one small size; the figure is not checked)."""
  m = flops.measure_matmul_peak(jax.local_devices()[0], "float32", sizes=(64,), min_repeats=2, min_seconds=0.0)
  assert m["flops"] > 0 and list(m["per_size"]) == ["64"]


def test_windowed_attention_counts_min_of_length_and_window_keys():
  from ztt_jax.model import ModelConfig
  full = ModelConfig(d_model=64, num_heads=4, mlp_dim=128).validate()
  win = full.replace(attention_window=8).validate()
  width = full.num_heads * full.head_dim
  # score and value products: 2 matmuls x 2 FLOPs per key and channel
  assert flops.layer_flops_per_token(full, 64) - flops.layer_flops_per_token(win, 64) == 4 * (64 - 8) * width
  assert flops.layer_flops_per_token(win, 8) == flops.layer_flops_per_token(full, 8)
  assert flops.layer_flops_per_token(win, 6) == flops.layer_flops_per_token(full, 6)
  gap = flops.train_flops_per_token(full, 64) - flops.train_flops_per_token(win, 64)
  assert gap == 3 * full.effective_depth * 4 * (64 - 8) * width

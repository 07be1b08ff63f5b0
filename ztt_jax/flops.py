"""FLOPs of a train step and the hardware peak they are compared with (MFU).

  python -m ztt_jax.flops [--remeasure] [--dtype=float32|bfloat16]   # this machine's cached peak
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from typing import Optional

import jax
import jax.numpy as jnp

from ztt_jax.model import lora

log = logging.getLogger(__name__)

# Dense bf16 peak per chip, from vendor datasheets.
_ACCELERATOR_PEAK = {
    "h200": 989e12, "h100": 989e12, "a100": 312e12, "l4": 121e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6": 918e12,
}


def train_flops_per_token(model_cfg, seq_len: int) -> float:
  """Forward + backward (3x forward) matmul FLOPs per token over the EFFECTIVE depth.

  Every cycle recomputes the shared layers, so compute scales with head + cycles * middle + tail
  even though the parameters do not. Attention uses the PaLM convention (full, not causal, T keys
  per query; min(T, w) with model.attention_window = w). The zero slot's one score per query (its
  value is zero) is not counted.
  """
  return 3.0 * forward_flops_per_token(model_cfg, seq_len)


def layer_flops_per_token(model_cfg, seq_len: int) -> float:
  """Forward matmul FLOPs of one transformer layer per token (attention over a full seq_len, or
  the model.attention_window keys when that is shorter)."""
  d, mlp_dim = model_cfg.d_model, model_cfg.mlp_dim
  attn_width = model_cfg.num_heads * model_cfg.head_dim
  kv_heads = getattr(model_cfg, "num_kv_heads", None) or model_cfg.num_heads
  proj = 2 * d * attn_width + 2 * d * kv_heads * model_cfg.head_dim  # q, o; k, v (grouped-query)
  mlp = (3 if model_cfg.mlp == "swiglu" else 2) * d * mlp_dim
  window = model_cfg.attention_window
  keys = seq_len if window is None else min(seq_len, window)
  attention = 2 * keys * attn_width
  return 2 * (proj + mlp) + 2 * attention


def forward_flops_per_token(model_cfg, seq_len: int, num_cycles=None) -> float:
  """Forward matmul FLOPs per token when the middle stack runs `num_cycles` cycles (default: the
  config's). Affine in the cycles, so a mean over tokens (a float) gives the mean FLOPs."""
  c = model_cfg.cycles if num_cycles is None else num_cycles
  shift = 2 * model_cfg.d_model ** 2 if model_cfg.token_shift else 0
  lora_deltas = c * model_cfg.stack_layers * lora.flops_per_layer(model_cfg)  # per-cycle LoRA
  return (model_cfg.effective_depth_at(c) * layer_flops_per_token(model_cfg, seq_len)
          + 2 * model_cfg.d_model * model_cfg.vocab_size + shift + lora_deltas)


def readout_flops_per_token(model_cfg, seq_len: int) -> float:
  """Forward FLOPs of one early read-out (tail layers + LM head, or the LM head alone with
  model.cycle_readout='direct'): what the confidence exit signal costs per cycle on top of the cycle."""
  tail = model_cfg.unique_tail_layers if getattr(model_cfg, "cycle_readout", "tail") == "tail" else 0
  return tail * layer_flops_per_token(model_cfg, seq_len) + 2 * model_cfg.d_model * model_cfg.vocab_size


# ------------------------------------------------------------------ hardware peak (MFU's denominator)
#
# A peak timed at every start-up made MFU depend on how busy the machine was in those few
# milliseconds: two runs of one shape once implied 388 and 229 GFLOP/s. The peak is therefore
# measured once per machine, over several sizes and many repeats (the max over sizes of the median
# time per size), cached in a JSON file, and reused by every later run on that machine.
# `train.peak_flops_per_device` overrides it; the value used is written to the metrics.

PEAK_CACHE_ENV = "ZTT_JAX_PEAK_FLOPS_CACHE"
# Square matmul sizes timed on CPU (and on an accelerator missing from the datasheet table).
_CPU_SIZES = (256, 512, 1024, 2048)
_ACCEL_SIZES = (2048, 4096, 8192)


def peak_cache_path() -> str:
  """$ZTT_JAX_PEAK_FLOPS_CACHE, else $XDG_CACHE_HOME/ztt_jax/peak_flops.json (~/.cache by default)."""
  if os.environ.get(PEAK_CACHE_ENV):
    return os.environ[PEAK_CACHE_ENV]
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "ztt_jax", "peak_flops.json")


def peak_cache_key(device, dtype: str) -> str:
  """backend / device kind / dtype / jax version; on CPU also the cores this process may use and
  the host's CPU model, since the same device kind ('cpu') covers very different hosts."""
  key = f"{device.platform}/{device.device_kind}/{jnp.dtype(dtype).name}/jax-{jax.__version__}"
  if device.platform == "cpu":
    key += f"/cores-{_usable_cores()}/{cpu_model()}"
  return key


def _usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def _load_1m() -> Optional[float]:
  try:
    return round(os.getloadavg()[0], 2)
  except (AttributeError, OSError):
    return None


def cpu_model() -> str:
  """The host CPU's model name (/proc/cpuinfo on Linux)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def measure_matmul_peak(device, dtype: str = "float32", sizes=None, min_repeats: int = 5,
                        min_seconds: float = 0.2) -> dict:
  """Times square matmuls on `device`: per size, at least `min_repeats` calls and `min_seconds`
  after a warm-up call; returns {'flops': max over sizes of the median-time FLOP/s, 'per_size': ...}.

  The median keeps one lucky or unlucky call from setting the figure; the max over sizes takes the
  size this backend tiles best (small sizes underfill the cores, large ones leave the cache)."""
  sizes = sizes or (_CPU_SIZES if device.platform == "cpu" else _ACCEL_SIZES)
  dt = jnp.dtype(dtype)
  # The accumulator is float32 whatever the inputs, as in the model's own matmuls.
  mm = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  per_size = {}
  for n in sizes:
    a = jax.device_put(jnp.ones((n, n), dt), device)
    b = jax.device_put(jnp.full((n, n), 0.5, dt), device)
    mm(a, b).block_until_ready()
    times = []
    t_start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - t_start < min_seconds:
      t = time.perf_counter()
      mm(a, b).block_until_ready()
      times.append(time.perf_counter() - t)
    per_size[str(n)] = 2.0 * n ** 3 / statistics.median(times)
  return {"flops": max(per_size.values()), "per_size": per_size}


def _read_cache(path: str) -> dict:
  """The cache's entries; {} if it does not exist. A file that is not a JSON object of entries
  with a positive 'flops' is reported and ignored (it is rewritten after the next measurement)."""
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:
    log.warning("Ignoring the unreadable peak-FLOPs cache %s (%s); measuring the peak again.", path, e)
    return {}
  if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
    log.warning("Ignoring the peak-FLOPs cache %s: not a JSON object of entries; measuring the peak again.", path)
    return {}
  return data


def _valid_entry(entry) -> bool:
  v = entry.get("flops") if isinstance(entry, dict) else None
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _write_cache(path: str, data: dict) -> None:
  """Atomic replace, so a concurrent reader never sees half a file; a read-only home only costs
  a re-measurement next time."""
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".peak_flops.")
    with os.fdopen(fd, "w") as f:
      json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
  except OSError as e:
    log.warning("Could not write the peak-FLOPs cache %s (%s); the peak will be measured again next run.", path, e)


def measured_peak(device=None, dtype: str = "float32", *, remeasure: bool = False) -> dict:
  """The cached matmul peak of `device` (default: the first local device) for `dtype`; measured
  and cached on first use, or when `remeasure` (e.g. after the first one ran on a busy machine).

  Returns the cache entry: {'flops', 'per_size', 'measured_at', 'method', 'cache': path,
  'from_cache': bool}. On CPU the figure is the whole host's, whatever the number of (fake) devices."""
  device = device or jax.local_devices()[0]
  path, key = peak_cache_path(), peak_cache_key(device, dtype)
  data = _read_cache(path)
  entry = data.get(key)
  if entry is not None and not remeasure:
    if _valid_entry(entry):
      return {**entry, "cache": path, "from_cache": True}
    log.warning("Peak-FLOPs cache %s has a bad entry for %s (%r); measuring the peak again.", path, key, entry)
  log.info("Measuring the %s matmul peak of %s (once per machine; cached in %s).", dtype, key, path)
  load_1m = _load_1m()
  m = measure_matmul_peak(device, dtype)
  entry = {"flops": m["flops"], "per_size": m["per_size"], "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "method": "max over square matmul sizes of the median FLOP/s (>= 5 calls, >= 0.2 s each)",
           "load_avg_1m": load_1m}
  if device.platform == "cpu" and load_1m is not None and load_1m > _usable_cores():
    # The figure stays (a changing peak is what made MFU untrustworthy), but say how to refresh it.
    log.warning("Measured the CPU peak (%.1f GFLOP/s) while the load average was %.1f on %d cores; it may be "
                "low. On a quiet machine, refresh it with: python -m ztt_jax.flops --remeasure",
                m["flops"] / 1e9, load_1m, _usable_cores())
  data[key] = entry
  _write_cache(path, data)
  return {**entry, "cache": path, "from_cache": False}


def datasheet_peak(device_kind: str) -> Optional[float]:
  """Dense bf16 peak of one chip from the vendor table, or None for an unknown kind."""
  kind = device_kind.lower()
  for name, peak in _ACCELERATOR_PEAK.items():
    if name in kind:
      return peak
  return None


def peak_flops_info(configured_per_device=None, dtype: str = "float32") -> dict:
  """The peak used for MFU and where it came from.

  Returns {'per_device', 'total' (all local devices of this process), 'num_devices', 'source'}:
  source 'config' (train.peak_flops_per_device), 'datasheet' (known accelerator, dense bf16) or
  'measured' / 'cache' (the cached matmul peak). On CPU, fake devices share the host's cores, so
  the measured host peak is split evenly over them and the total is the host's peak."""
  devices = jax.local_devices()
  n = len(devices)
  if configured_per_device:
    per = float(configured_per_device)
    return {"per_device": per, "total": per * n, "num_devices": n, "source": "config"}
  dev = devices[0]
  if dev.platform != "cpu":
    table = datasheet_peak(dev.device_kind)
    if table is not None:
      return {"per_device": table, "total": table * n, "num_devices": n, "source": "datasheet"}
  m = measured_peak(dev, dtype)
  source = "cache" if m["from_cache"] else "measured"
  if dev.platform == "cpu":
    return {"per_device": m["flops"] / n, "total": m["flops"], "num_devices": n, "source": source}
  return {"per_device": m["flops"], "total": m["flops"] * n, "num_devices": n, "source": source}


def peak_flops(configured_per_device=None, dtype: str = "float32") -> float:
  """Peak FLOP/s of everything this process drives, for MFU (see peak_flops_info)."""
  return peak_flops_info(configured_per_device, dtype)["total"]


@functools.lru_cache(maxsize=None)
def measured_cpu_matmul_peak() -> float:
  """The host CPU's cached float32 matmul peak (all its cores); kept for ztt_jax.bench."""
  return measured_peak(jax.local_devices(backend="cpu")[0], "float32")["flops"]


def main(argv) -> None:
  """Prints (or with --remeasure refreshes) this machine's cached matmul peak."""
  del argv
  from absl import flags
  f = flags.FLAGS
  dev = jax.local_devices()[0]
  m = measured_peak(dev, f.dtype, remeasure=f.remeasure)
  sizes = ", ".join(f"{k}: {v / 1e9:.1f}" for k, v in sorted(m["per_size"].items(), key=lambda kv: int(kv[0])))
  load = m.get("load_avg_1m")
  print(f"{peak_cache_key(dev, f.dtype)}\n  peak {m['flops'] / 1e9:.1f} GFLOP/s "
        f"({'from cache' if m['from_cache'] else 'measured now'} at {m.get('measured_at', '?')}, load average "
        f"{'?' if load is None else load}; per size GFLOP/s {sizes})\n  cache {m['cache']}")
  table = datasheet_peak(dev.device_kind) if dev.platform != "cpu" else None
  if table:
    print(f"  MFU uses the datasheet dense bf16 peak instead: {table / 1e12:.0f} TFLOP/s per chip")


def _define_flags():
  from absl import flags
  flags.DEFINE_bool("remeasure", False, "Measure again and overwrite the cache entry.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Matmul input dtype.")


if __name__ == "__main__":
  from ztt_jax import cli
  _define_flags()
  cli.run(main)

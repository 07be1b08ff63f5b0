"""Ahead-of-time compile the sharded train step for a target topology, before paying for it.

  python -m ztt_jax.compile_check --config=configs/default.py --topology=cpu:8 \\
      --config.mesh.shape='(2,2,2)' [--num_hosts=2] [--device_memory_gib=16] [--config.a.b=v ...]

Builds the run exactly as `ztt_jax.train` does (same mesh, shardings and jitted step), lowers the
step on abstract inputs (nothing is allocated, no data is read) and compiles it. Mesh, sharding and
divisibility mistakes fail here with the same error they would give on the cluster, and XLA's
memory analysis gives the per-device bytes of arguments, outputs and temporaries.

Topologies:
  cpu:N     N fake CPU devices on this machine (the command re-runs itself in a child process with
            XLA_FLAGS=--xla_force_host_platform_device_count=N). This checks the mesh, the shardings,
            batch divisibility and the SPMD partitioning of the real program, and gives per-device
            sizes of params, optimizer state and batch. Temporaries are those of XLA's CPU compiler:
            a rough guide, not the TPU/GPU figure (fusion, layouts and scheduling differ).
  tpu:NAME  a Cloud TPU topology such as tpu:v5e:4x4 or tpu:v4:2x2x4, compiled by XLA's TPU compiler
            through `jax.experimental.topologies.get_topology_desc`, on any machine. That needs
            libtpu (`pip install "jax[tpu]"`, or `libtpu==0.0.42.*` for jax 0.10.2); without it the
            check stops and says so (exit code 3). --num_hosts defaults to the topology's hosts.

Exit codes: 0 compiled (and fits, if --device_memory_gib is given); 1 compile, sharding or memory
error; 2 bad config or arguments; 3 topology unsupported by this installation.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ztt_jax import config as config_lib
from ztt_jax import partitioning
from ztt_jax import run as run_lib
from ztt_jax.data.config import SYNTHETIC_KINDS
from ztt_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "cpu:N or tpu:NAME (e.g. tpu:v5e:4x4).",
                                required=True)
_NUM_HOSTS = flags.DEFINE_integer(
    "num_hosts", None, "Processes the run will have: checks that each reads a whole share of the "
    "batch. Default: the TPU topology's host count, 1 for cpu:N.")
_DEVICE_MEMORY_GIB = flags.DEFINE_float(
    "device_memory_gib", None, "Per-device memory budget; the check fails if the estimate exceeds it.")
_JSON = flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")

_CHILD_ENV = "ZTT_COMPILE_CHECK_CHILD"
EXIT_OK, EXIT_COMPILE, EXIT_CONFIG, EXIT_UNSUPPORTED = 0, 1, 2, 3


class UnsupportedTopology(RuntimeError):
  pass


@dataclasses.dataclass
class Report:
  topology: str
  num_devices: int
  mesh_shape: dict
  num_hosts: int
  ok: bool = False
  error: Optional[str] = None
  memory: dict = dataclasses.field(default_factory=dict)
  flops: Optional[float] = None
  param_count: Optional[int] = None
  notes: list = dataclasses.field(default_factory=list)

  def text(self) -> str:
    lines = [f"compile check: topology {self.topology}, {self.num_devices} devices, "
             f"mesh {self.mesh_shape}, {self.num_hosts} host(s)"]
    if self.param_count is not None:
      lines.append(f"  params: {self.param_count:,}")
    for k in ("arguments", "outputs", "aliased", "temporaries", "generated_code", "peak_estimate"):
      if k in self.memory:
        lines.append(f"  per device {k + ':':<16}{_fmt_bytes(self.memory[k])}")
    if self.flops is not None:
      lines.append(f"  XLA cost analysis: {self.flops:.3e} FLOPs per step per device")
    lines += [f"  note: {n}" for n in self.notes]
    lines.append("  OK: the train step compiled." if self.ok else f"  FAILED: {self.error}")
    return "\n".join(lines)


def _fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024


def parse_topology(topology: str) -> tuple[str, Any]:
  """'cpu:8' -> ('cpu', 8); 'tpu:v5e:4x4' -> ('tpu', 'v5e:4x4')."""
  kind, _, rest = topology.partition(":")
  if kind == "cpu" and re.fullmatch(r"[1-9]\d*", rest):
    return "cpu", int(rest)
  if kind == "tpu" and rest:
    return "tpu", rest
  raise ValueError(f"--topology={topology!r}: use cpu:N (N fake CPU devices, e.g. cpu:64) or "
                   "tpu:NAME (e.g. tpu:v5e:4x4, needs libtpu).")


def topology_devices(topology: str) -> list:
  """The devices to compile for. For cpu:N this process must already have N CPU devices."""
  kind, arg = parse_topology(topology)
  if kind == "cpu":
    devices = jax.devices("cpu")
    if len(devices) != arg:
      raise ValueError(
          f"this process has {len(devices)} CPU devices, not {arg}; start it with "
          f"XLA_FLAGS=--xla_force_host_platform_device_count={arg} (the CLI does this itself).")
    return devices
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(arg, platform="tpu").devices)
  except Exception as e:  # noqa: BLE001 - libtpu missing raises RuntimeError; bad names other types
    if "not installed" in str(e) or "libtpu" in str(e).lower():
      raise UnsupportedTopology(
          f"--topology={topology}: this JAX {jax.__version__} installation cannot describe TPU "
          f"topologies ({e}). TPU ahead-of-time compilation needs libtpu: install it with "
          "`pip install \"jax[tpu]\"` (it also works on a CPU-only machine), or check the mesh on "
          "fake CPU devices with --topology=cpu:N.") from e
    raise ValueError(f"--topology={topology}: {type(e).__name__}: {e}") from e


def abstract_batch(cfg, mesh):
  """Global-batch shapes the train step receives (what `partitioning.to_global` builds)."""
  b, t = cfg.train.global_batch_size, cfg.data.seq_len
  sharding = partitioning.batch_sharding(mesh)
  spec = {"inputs": ((b, t), jnp.int32), "targets": ((b, t), jnp.int32),
          "weights": ((b, t), jnp.float32)}
  if cfg.data.kind in SYNTHETIC_KINDS:
    spec["difficulty"] = ((b, t), jnp.int32)  # per token: the difficulty of the position scored there
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in spec.items()}


def check(cfg, devices, *, topology: str = "in-process", num_hosts: int = 1,
          device_memory_gib: Optional[float] = None) -> Report:
  """Lowers and compiles the train step of `cfg` on `devices`; never raises for compile errors."""
  cfg.validate()
  shape = partitioning.resolve_mesh_shape(cfg.mesh.shape, len(devices))  # ConfigError if it can't
  report = Report(topology, len(devices), dict(zip(("data", "fsdp", "tensor"), shape)), num_hosts)
  partitioning.check_batch_split(cfg.train.global_batch_size, num_hosts, data_parallel=shape[0] * shape[1],
                                 microbatches=cfg.train.microbatches, processes_name=f"--num_hosts={num_hosts}")
  run = run_lib.build(cfg, devices)
  report.param_count = int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(run.abstract_state.params)))
  indivisible = partitioning.indivisible_leaf(run.abstract_state)
  if indivisible:
    report.error = indivisible
    return report
  step = run_lib.jit_train_step(run)
  try:
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.axis_rules):
      compiled = step.lower(run.abstract_state, abstract_batch(cfg, run.mesh)).compile()
  except Exception as e:  # noqa: BLE001 - the point is to report it
    report.error = f"{type(e).__name__}: {e}"
    return report
  mem = compiled.memory_analysis()
  if mem is not None:
    report.memory = {
        "arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
        "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
        "generated_code": mem.generated_code_size_in_bytes,
        # Donated state aliases its output, so it is counted once.
        "peak_estimate": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                          - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
    }
  else:
    report.notes.append("this backend gives no memory analysis")
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report.flops = float(cost["flops"]) if cost and "flops" in cost else None
  except Exception:  # noqa: BLE001 - optional information
    pass
  if devices[0].platform == "cpu":
    report.notes.append("compiled by XLA's CPU compiler: shardings and per-device argument sizes "
                        "carry over to TPU/GPU, temporaries only roughly")
  if device_memory_gib is not None and report.memory:
    budget = device_memory_gib * 2**30
    if report.memory["peak_estimate"] > budget:
      report.error = (f"estimated {_fmt_bytes(report.memory['peak_estimate'])} per device exceeds "
                      f"--device_memory_gib={device_memory_gib}. Shard more (mesh.shape fsdp/tensor), "
                      "lower train.global_batch_size or raise train.microbatches, or enable remat.")
      return report
  report.ok = True
  return report


def _rerun_with_devices(n: int) -> int:
  """Fake CPU devices are fixed when jax starts, so a fresh interpreter gets the flag."""
  flags_env = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  env = dict(os.environ, XLA_FLAGS=f"{flags_env} --xla_force_host_platform_device_count={n}".strip(),
             JAX_PLATFORMS="cpu", **{_CHILD_ENV: "1"})
  return subprocess.call([sys.executable, "-m", "ztt_jax.compile_check", *sys.argv[1:]], env=env)


def main(argv):
  del argv
  try:
    kind, arg = parse_topology(_TOPOLOGY.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if kind == "cpu" and os.environ.get(_CHILD_ENV) != "1":
    sys.exit(_rerun_with_devices(arg))

  try:
    cfg = config_lib.parse(_CONFIG.value)
    devices = topology_devices(_TOPOLOGY.value)
    num_hosts = _NUM_HOSTS.value or len({d.process_index for d in devices})
    report = check(cfg, devices, topology=_TOPOLOGY.value, num_hosts=num_hosts,
                   device_memory_gib=_DEVICE_MEMORY_GIB.value)
  except UnsupportedTopology as e:
    print(f"compile check: UNSUPPORTED: {e}", flush=True)
    sys.exit(EXIT_UNSUPPORTED)
  except (ConfigError, ValueError) as e:
    print(f"compile check: CONFIG ERROR: {type(e).__name__}: {e}", flush=True)
    sys.exit(EXIT_CONFIG)
  print(report.text(), flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(dataclasses.asdict(report), f, indent=2)
  sys.exit(EXIT_OK if report.ok else EXIT_COMPILE)


if __name__ == "__main__":
  from ztt_jax import cli  # a bad --topology or flag: one line, exit 2 (EXIT_CONFIG)
  cli.run(main)

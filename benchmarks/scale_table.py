"""The pod scale table (docs/scaling.md): ahead-of-time compiles of configs/scale.py's 1B- and 8B-class
ZTTs for TPU v5e and v5p topologies, through `ztt_jax.compile_check` with libtpu.

  PYTHONPATH=/tmp/libtpu_site python benchmarks/scale_table.py --out=runs/scale_table [--rows=0,3] [--cpu]

Each row compiles the real sharded train step twice, at 1 and 2 sequences per data-parallel shard,
and reads XLA's TPU memory analysis. Memory is taken as linear in the batch between the two (the
state and the code do not grow with it; activations do), which gives the largest global batch that
fits the chip's HBM; that figure is an extrapolation, the two compiled points are measured. FLOPs per
step are ztt_jax.flops' model FLOPs (6N per token plus attention, every cycle counted): XLA's cost
analysis counts a loop body once, so it undercounts scanned layers and cycles, and is shown beside.
Finished rows are kept in --out/<row>.json and not compiled again.

--cpu also compiles each row's 1-sequence point for as many fake CPU devices (`--topology=cpu:N`,
rows of at most --cpu_max_devices chips) and shows XLA:CPU's peak estimate beside the TPU compile's:
the estimate a user without libtpu would get, and how far it is from the TPU's.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ztt_jax import config as config_lib  # noqa: E402
from ztt_jax.flops import train_flops_per_token  # noqa: E402

HBM_GIB = {"v5e": 16.0, "v5p": 95.0}  # per chip, Cloud TPU documentation
# (preset, TPU version, topology, mesh (data, fsdp, tensor))
ROWS = [
    ("1b", "v5e", "4x4", (1, 16, 1)),
    ("1b", "v5e", "4x4", (1, 4, 4)),
    ("1b", "v5e", "16x16", (1, 256, 1)),
    ("8b", "v5p", "2x2x4", (1, 16, 1)),
    ("8b", "v5p", "2x2x4", (1, 4, 4)),
    ("8b", "v5p", "4x4x4", (1, 64, 1)),
    ("8b", "v5e", "16x16", (1, 64, 4)),
]

_OUT = flags.DEFINE_string("out", "runs/scale_table", "Folder for each row's compile reports.")
_ROWS = flags.DEFINE_list("rows", None, "Row indices to run (default: all).")
_CPU = flags.DEFINE_bool("cpu", False, "Also compile each row's 1-sequence point for N fake CPU devices.")
_CPU_MAX = flags.DEFINE_integer("cpu_max_devices", 16, "--cpu: only rows of at most this many chips.")


def command(preset: str, version: str, topo: str, mesh: tuple, per_shard: int, json_path: str,
            topology: str = "") -> list[str]:
  global_batch = per_shard * mesh[0] * mesh[1]
  return [sys.executable, "-m", "ztt_jax.compile_check", f"--config=configs/scale.py:{preset}",
          f"--topology={topology or f'tpu:{version}:{topo}'}", f"--config.mesh.shape=({','.join(map(str, mesh))})",
          f"--config.train.global_batch_size={global_batch}", f"--json={json_path}"]


def _compiled(i: int, cmd: list[str], path: pathlib.Path) -> dict:
  if not path.exists():
    print("$", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if not path.exists():
      raise SystemExit(f"row {i} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
  return json.loads(path.read_text())


def compile_row(i: int, out: pathlib.Path, cpu: bool = False, cpu_max_devices: int = 16) -> dict:
  preset, version, topo, mesh = ROWS[i]
  done = out / f"row{i}.json"
  if done.exists():
    row = json.loads(done.read_text())
  else:
    points = [_compiled(i, command(preset, version, topo, mesh, per_shard, str(out / f"row{i}_b{per_shard}.json")),
                        out / f"row{i}_b{per_shard}.json") for per_shard in (1, 2)]
    row = {"row": i, "preset": preset, "topology": f"{version}:{topo}", "mesh": mesh, "points": points,
           "command": " ".join(["python"] + command(preset, version, topo, mesh, 1, "r.json")[1:-1])}
    done.write_text(json.dumps(row, indent=1))
  devices = math.prod(mesh)
  if cpu and devices <= cpu_max_devices:
    path = out / f"row{i}_cpu.json"
    cmd = command(preset, version, topo, mesh, 1, str(path), topology=f"cpu:{devices}")
    row["cpu_point"] = _compiled(i, cmd, path)
    row["cpu_command"] = " ".join(["python"] + cmd[1:-1])
  return row


def summarise(row: dict) -> dict:
  preset, mesh = row["preset"], tuple(row["mesh"])
  version = row["topology"].split(":")[0]
  dp = mesh[0] * mesh[1]
  # A point the TPU compiler refused (it stops when a program exceeds HBM) has no memory analysis.
  p1, p2 = (p["memory"].get("peak_estimate", math.inf) if p["ok"] else math.inf for p in row["points"])
  hbm = HBM_GIB[version] * 2**30
  if p1 > hbm:
    fits = 0
  elif p2 > hbm:
    fits = 1
  else:
    fits = 1 + math.floor((hbm - p1) / max(p2 - p1, 1))
  cfg = config_lib.parse(_preset_dict(preset))
  tokens = cfg.data.seq_len
  devices = row["points"][0]["num_devices"]
  return {
      "preset": preset, "topology": row["topology"], "devices": devices,
      "mesh": f"data {mesh[0]} x fsdp {mesh[1]} x tensor {mesh[2]}",
      "params": row["points"][0]["param_count"],
      "state_gib": row["points"][0]["memory"].get("arguments", math.nan) / 2**30,
      "errors": [p["error"] for p in row["points"] if p["error"]],
      "peak_gib_1": p1 / 2**30, "peak_gib_2": p2 / 2**30, "hbm_gib": HBM_GIB[version],
      "max_global_batch": fits * dp,
      "model_tflops_per_seq": train_flops_per_token(cfg.model, tokens) * tokens / 1e12,
      "xla_tflops_per_device_b1": (row["points"][0].get("flops") or 0) / 1e12,
      "command": row["command"],
      "cpu_peak_gib_1": row["cpu_point"]["memory"].get("peak_estimate", math.nan) / 2**30 if "cpu_point" in row else None,
      "cpu_command": row.get("cpu_command"),
  }


def _preset_dict(preset: str):
  sys.path.insert(0, str(ROOT / "configs"))
  import scale  # configs/scale.py
  return scale.get_config(preset)


def table(rows: list[dict]) -> str:
  head = ("| model | TPU | chips | mesh | params | state / chip | peak / chip at 1 seq per shard | at 2 | "
          "HBM | largest global batch (seqs of 8,192) | model TFLOPs per step at that batch |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    lines.append(
        f"| {r['preset']} | {r['topology']} | {r['devices']} | {r['mesh']} | {r['params'] / 1e9:.2f}B | "
        f"{r['state_gib']:.2f} GiB | {r['peak_gib_1']:.2f} GiB | {r['peak_gib_2']:.2f} GiB | {r['hbm_gib']:.0f} GiB | "
        f"{r['max_global_batch']:,} | {r['model_tflops_per_seq'] * r['max_global_batch']:,.0f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  if not os.environ.get("PYTHONPATH", "").strip():
    print("note: libtpu must be importable (e.g. PYTHONPATH=/tmp/libtpu_site, docs/scaling.md)")
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  indices = [int(i) for i in _ROWS.value] if _ROWS.value else range(len(ROWS))
  rows = [summarise(compile_row(i, out, _CPU.value, _CPU_MAX.value)) for i in indices]
  (out / "table.json").write_text(json.dumps(rows, indent=1))
  print(table(rows))
  for r in rows:
    print(f"row {r['preset']} {r['topology']} {r['mesh']}: {r['command']}")
    if r["cpu_peak_gib_1"] is not None:
      print(f"  XLA:CPU's estimate at 1 seq per shard: {r['cpu_peak_gib_1']:.2f} GiB per device against the TPU "
            f"compile's {r['peak_gib_1']:.2f} GiB ({r['cpu_command']})")


if __name__ == "__main__":
  app.run(main)

"""Where ztt_jax's CPU train step spends its time, from the optimized HLO (deterministic) and timing.

  .venv/bin/python benchmarks/profile_step.py [--rows=baby,d256,ztt] [--variants=...] [--time]
      [--json=FILE] [--dump_dir=DIR]

For each row (the shapes of benchmarks/vs_torch.py) and each variant, compiles ztt_jax's real train
step and reads the optimized HLO with benchmarks/hlo_stats.py: matmul FLOPs actually executed per
step (loop trip counts included, so remat's recompute shows), top-level ops (each one a thunk XLA:CPU
dispatches), while loops, bytes moved by copies and transposes (inside fusions and on their own),
plus XLA's cost analysis (transcendentals) and memory analysis. None of that depends on how busy
the machine is. `--time` also times the variants in alternating windows (noisy on a shared host).

Variants (those that change code outside benchmarks/ patch it for this process only, to measure a
proposal before anyone edits the file):
  default       the config as it is (model.remat_policy and model.attention_impl defaults)
  reference     model.attention_impl=reference (dense [B,H,T,T] scores, the hand-rolled softmax)
  chunked       model.attention_impl=chunked (blockwise online softmax)
  remat_none    model.remat_policy=none
  remat_nothing model.remat_policy=nothing_saveable
  unrolled      the layer scan unrolled (nn.scan(..., unroll=n_layers) in LayerStack; patch)
  unrolled_none both
  xla_attention vanilla only: jax.nn.dot_product_attention (implementation='xla') in place of
                zero_slot_attention (patch)
  bf16          model.dtype=bfloat16
  block64/256   model.attention_block_size=64 / 256 (chunked's query and key block; CPU default 128)
  grain         not an HLO variant: the CPU time the trainer's Grain pipeline spends per batch
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as flax_nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from hlo_stats import hlo_stats  # noqa: E402
from ztt_step import ZttStep, alternating_windows, make_config, token_batches  # noqa: E402
from vs_torch import GPT2_FORM, ROWS, SHAPES, VOCAB, ZTT_LAYOUT  # noqa: E402
from ztt_jax.flops import train_flops_per_token  # noqa: E402

VARIANTS = ("default", "reference", "chunked", "remat_none", "remat_nothing", "unrolled", "unrolled_none",
            "xla_attention", "bf16", "block64", "block256")


@contextlib.contextmanager
def unrolled_layer_scan():
  """LayerStack calls `nn.scan` through ztt_jax.model.block's `nn`; give it a full unroll."""
  from ztt_jax.model import block

  class _NN:
    def __getattr__(self, name):
      return getattr(flax_nn, name)

    @staticmethod
    def scan(target, **kw):
      kw.setdefault("unroll", kw.get("length") or 1)
      return flax_nn.scan(target, **kw)

  saved = block.nn
  block.nn = _NN()
  try:
    yield
  finally:
    block.nn = saved


@contextlib.contextmanager
def xla_attention():
  """Plain causal attention through jax.nn.dot_product_attention when there is no zero slot."""
  from ztt_jax.model import attention
  saved = attention.zero_slot_attention

  def attn(q, k, v, zero_key=None, zero_bias=None, mask_zero_slot=None, valid_TxS=None, **kw):
    if zero_key is not None or valid_TxS is not None or kw.get("q_positions_T") is not None:
      return saved(q, k, v, zero_key, zero_bias, mask_zero_slot, valid_TxS, **kw)
    B, T, H, _ = q.shape
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    return out, jnp.zeros((B, H, T), jnp.float32)

  attention.zero_slot_attention = attn
  try:
    yield
  finally:
    attention.zero_slot_attention = saved


# Variants that only change the config: their model overrides.
CONFIG_VARIANTS = {
    "default": {}, "reference": {"attention_impl": "reference"}, "chunked": {"attention_impl": "chunked"},
    "remat_none": {"remat_policy": "none"}, "remat_nothing": {"remat_policy": "nothing_saveable"},
    "bf16": {"dtype": "bfloat16"}, "block64": {"attention_block_size": 64},
    "block256": {"attention_block_size": 256},
}


def variant_setup(variant: str, layout: str):
  """(model overrides, patch context) of a variant, or None where it does not apply."""
  if variant in CONFIG_VARIANTS:
    return CONFIG_VARIANTS[variant], contextlib.nullcontext()
  if variant in ("unrolled", "unrolled_none"):
    return CONFIG_VARIANTS["remat_none" if variant == "unrolled_none" else "default"], unrolled_layer_scan()
  if variant == "xla_attention":
    return ({}, xla_attention()) if layout == "vanilla" else None
  raise SystemExit(f"unknown variant {variant!r}; use {', '.join(VARIANTS)}")


def row_model(row: str) -> tuple[dict, dict, str]:
  shape_name, layout, _ = ROWS[row]
  s = SHAPES[shape_name]
  model = dict(variant="vanilla", d_model=s["d"], num_heads=s["heads"], mlp_dim=s["mlp"], vocab_size=VOCAB,
               n_head_layers=0, n_middle_layers=s["layers"], n_tail_layers=0, num_cycles=1, **GPT2_FORM)
  if layout == "ztt":
    model.update(variant="ztt", **ZTT_LAYOUT)
  return model, s, layout


def analyse(step: ZttStep, T: int, tokens: int, dump_dir=None, name="") -> dict:
  text = step.compiled.as_text()
  if dump_dir:
    os.makedirs(dump_dir, exist_ok=True)
    with open(os.path.join(dump_dir, f"{name}.hlo.txt"), "w") as f:
      f.write(text)
  st = hlo_stats(text)
  model_flops = train_flops_per_token(step.cfg.model, T) * tokens
  ca = step.cost_analysis()
  mem = step.memory_analysis()
  return {
      "model_flops": model_flops, "dot_flops": st.get("dot_flops", 0),
      "dot_over_model_flops": st.get("dot_flops", 0) / model_flops,
      "top_level_ops": st.get("top_level_ops", 0), "while_loops": st.get("while_loops", 0),
      "copy_transpose_bytes_top_level": st.get("copies_top_level_bytes", 0) + st.get("transposes_top_level_bytes", 0),
      "copy_transpose_bytes_in_fusion": st.get("copies_in_fusion_bytes", 0) + st.get("transposes_in_fusion_bytes", 0),
      "copies_top_level": st.get("copies_top_level", 0),
      "transcendentals_xla_body_once": ca.get("transcendentals"),
      "temp_bytes": mem.get("temp_size_in_bytes"),
      "top_level_by_op": st["top_level_by_op"],
      "copy_transpose_sources": st["copy_transpose_sources"][:12],
  }


def _category(ins: dict) -> tuple[str, str]:
  """(what kind of kernel, which part of the model) of one top-level HLO instruction."""
  import re
  op, tail = ins["op"], ins["tail"]
  meta = re.search(r'op_name="([^"]*)"', ins["line"])
  name = meta.group(1) if meta else ""
  if op == "dot" or (op == "fusion" and ("__ynn_fusion" in tail or "kind=kCustom" in tail or "kind=kOutput" in tail)):
    kind = "matmul"
  elif op in ("copy", "transpose") or (op == "fusion" and ins["name"].startswith(("copy", "transpose"))):
    kind = "copy/transpose"
  elif op == "fusion" and ins["name"].startswith("wrapped_broadcast"):
    kind = "fill (broadcast)"
  elif op in ("dynamic-update-slice", "dynamic-slice") or "dynamic" in ins["name"]:
    kind = "scan slicing"
  else:
    kind = "elementwise/reduce"
  part = "optimizer/update"
  if "ZTTModel" in name:
    part = "other model"
    for key, label in (("attn_norm", "norm"), ("mlp_norm", "norm"), ("final_norm", "norm"), ("/attn/", "attention"),
                       ("/mlp/", "mlp"), ("embed", "embed/lm head")):
      if key in name:
        part = label
        break
  elif "cross_entropy" in name or "log_softmax" in name or "logsumexp" in name:
    part = "loss"
  if "rematted_computation" in name:
    part += " (remat recompute)"
  return kind, part


def trace_step(step: ZttStep, batches, n_steps: int = 5) -> dict:
  """Per-kernel time from jax.profiler (XLA:CPU names each thunk after its HLO instruction),
  grouped by kernel kind and model part. Timing, so noisy in absolute terms; the split between
  categories is what to read."""
  import collections
  import glob
  import tempfile
  from hlo_stats import parse
  comps, _, _ = parse(step.compiled.as_text())
  by_name = {ins["name"]: ins for c in comps.values() for ins in c}
  for i in range(2):
    step.step(batches[i % len(batches)])
  step.sync()
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    jax.profiler.start_trace(d)
    for i in range(n_steps):
      step.step(batches[i % len(batches)])
    step.sync()
    jax.profiler.stop_trace()
    wall = (time.perf_counter() - t0) / n_steps
    prof = jax.profiler.ProfileData.from_file(glob.glob(d + "/**/*.xplane.pb", recursive=True)[0])
    kind_t, part_t, top = collections.Counter(), collections.Counter(), collections.Counter()
    for plane in prof.planes:
      for line in plane.lines:
        if "XLAEigen" not in line.name and "PjRtCpu" not in line.name:
          continue
        for e in line.events:
          ins = by_name.get(e.name)
          if ins is None or ins["op"] in ("while", "conditional", "call"):
            continue  # containers: their bodies' thunks are counted themselves
          kind, part = _category(ins)
          ms = e.duration_ns / 1e6 / n_steps
          kind_t[kind] += ms
          part_t[part] += ms
          top[(e.name, kind, part)] += ms
  busy = sum(kind_t.values())
  return {"wall_ms_per_step": wall * 1e3, "kernel_ms_per_step": busy,
          "by_kind_ms": dict(kind_t.most_common()), "by_part_ms": dict(part_t.most_common()),
          "top_kernels": [{"name": n, "kind": k, "part": p, "ms": v} for (n, k, p), v in top.most_common(12)]}


def grain_cost(seq_len: int, batch: int, n: int = 20) -> dict:
  """CPU seconds per batch of the trainer's own Grain pipeline on byte text, and its thread count.

  The step cannot use those cycles: on 2 cores a background reader competes with XLA's threads.
  Measured as thread CPU time (time.thread_time in the consuming thread plus the process total),
  which does not depend on wall-clock noise the way a tokens/s figure does."""
  import tempfile
  from ztt_jax import data as data_lib
  from ztt_jax.config import base_config, parse
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "corpus.txt")
    src = "/work/shared/data/tinyshakespeare.txt"
    text = open(src).read() if os.path.exists(src) else "lorem ipsum dolor sit amet " * 40000
    with open(path, "w") as f:
      f.write(text)
    cfg = base_config()
    cfg.data.kind, cfg.data.path, cfg.data.seq_len, cfg.data.cache_dir = "text", path, seq_len, tmp
    cfg.model.max_seq_len = seq_len
    cfg.train.global_batch_size = batch
    cfg = parse(cfg)
    it = data_lib.make_train_iterator(cfg.data, global_batch_size=batch, vocab_size=cfg.model.vocab_size,
                                      process_index=0, process_count=1)
    next(it)
    threads_before = threading.active_count()
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(n):
      next(it)
    cpu = (time.process_time() - c0) / n
    wall = (time.perf_counter() - w0) / n
    return {"cpu_s_per_batch": cpu, "wall_s_per_batch": wall, "python_threads": threads_before,
            "read_threads": cfg.data.read_threads, "prefetch_batches": cfg.data.prefetch_batches}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rows", default="baby,d256,ztt")
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--time", action="store_true", help="also time the variants (alternating windows)")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--window_s", type=float, default=1.5)
  ap.add_argument("--trace", action="store_true", help="jax.profiler trace of each variant: time per kernel kind")
  ap.add_argument("--grain", action="store_true", help="measure the Grain pipeline's CPU per batch")
  ap.add_argument("--dump_dir", default=None, help="write each variant's optimized HLO here")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  out = {"jax": jax.__version__, "load": os.getloadavg(), "rows": {}}
  for row in [r for r in args.rows.split(",") if r]:
    model, s, layout = row_model(row)
    tokens = s["B"] * s["T"]
    batches = token_batches(4, s["B"], s["T"], VOCAB)
    steps, res = {}, {}
    for v in [v for v in args.variants.split(",") if v]:
      setup = variant_setup(v, layout)
      if setup is None:
        continue
      over, patch = setup
      cfg = make_config(seq_len=s["T"], batch=s["B"], steps=1000, model={**model, **over})
      with patch:
        st = ZttStep(cfg, jax.devices("cpu")[0])
        compile_s = st.compile(batches[0])
      steps[v] = st
      res[v] = {"compile_s": compile_s, **analyse(st, s["T"], tokens, args.dump_dir, f"{row}_{v}")}
      r = res[v]
      print(f"{row:5s} {v:14s} dot {r['dot_flops'] / 1e9:7.3f} GFLOP ({r['dot_over_model_flops']:.3f}x model) | "
            f"{r['top_level_ops']:5d} top-level ops, {r['while_loops']} loops | copies+transposes "
            f"{r['copy_transpose_bytes_in_fusion'] / 2**20:6.1f} MiB fused, "
            f"{r['copy_transpose_bytes_top_level'] / 2**20:5.1f} MiB alone | temp {r['temp_bytes'] / 2**20:6.1f} MiB "
            f"| compile {compile_s:.1f}s", flush=True)
    if args.time and steps:
      windows = alternating_windows(steps, batches, tokens, args.rounds, args.window_s)
      for k in steps:
        res[k]["tokens_per_sec"] = statistics.median(windows[k])
        res[k]["tokens_per_sec_windows"] = windows[k]
      base = res["default"]["tokens_per_sec"] if "default" in res else None
      print(f"{row}: tokens/s (median of {args.rounds} alternating windows, load {os.getloadavg()[0]:.1f}): "
            + ", ".join(f"{k} {res[k]['tokens_per_sec']:,.0f}" + (f" ({res[k]['tokens_per_sec'] / base:.2f}x)" if base else "")
                        for k in steps), flush=True)
    if args.trace:
      for k, st in steps.items():
        tr = res[k]["trace"] = trace_step(st, batches)
        print(f"{row} {k} trace: {tr['wall_ms_per_step']:.1f} ms/step wall, kernels {tr['kernel_ms_per_step']:.1f} ms "
              f"(both Eigen threads) | by kind: " + ", ".join(f"{n} {v:.1f}" for n, v in tr["by_kind_ms"].items())
              + " | by part: " + ", ".join(f"{n} {v:.1f}" for n, v in tr["by_part_ms"].items()), flush=True)
    out["rows"][row] = {"shape": s, "variants": res}
  if args.grain:
    out["grain"] = {r: grain_cost(SHAPES[ROWS[r][0]]["T"], SHAPES[ROWS[r][0]]["B"]) for r in args.rows.split(",")}
    for r, g in out["grain"].items():
      print(f"grain {r}: {g['cpu_s_per_batch'] * 1e3:.2f} ms CPU per batch (wall {g['wall_s_per_batch'] * 1e3:.2f} ms), "
            f"read_threads={g['read_threads']} prefetch={g['prefetch_batches']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1, default=float)
  return out


if __name__ == "__main__":
  main()

"""The GPU benchmark behind benchmarks/gpu.sh: train speed and MFU of a ~1B ZTT, attention numerics,
decoding speed. One JSON and one table; every figure is measured in this run, nothing is filled in.

  python benchmarks/gpu_bench.py [--json=FILE] [--budget_s=400] [--tiny]

1. numerics   benchmarks/attention_check.py (check_against_reference) for what attention_impl=auto
              resolves to on this device (cudnn on an H100/H200 in bf16) and for chunked, against
              the float32 reference: max |diff| of out, a0 and every gradient.
2. train      a ZTT of ~1.0B unique params (d_model 2048, 16 query heads of 128 over 4 kv heads
              as in Llama 3, SwiGLU 5632, RMSNorm, RoPE, 2 head + 16 cycled middle + 2 tail
              layers, vocab 32768, tied embeddings; the loss blockwise, never the logits), bf16
              compute with float32 params and AdamW state, attention_impl=auto, remat default, at
              seq 2048 and 8192 with C=1 and C=4 cycles of the middle stack (effective depth 20
              and 68), ~16k tokens per step. The step is ztt_jax's own jitted train step (the
              trainer's build + jit_train_step). Reports compile seconds, median step time of
              `--steps` timed steps after 2 warm-up steps, tokens/s, and MFU = model FLOPs/s over
              the chip's dense bf16 peak (datasheet, by device_kind; H200 989 TFLOP/s). Model FLOPs
              are ztt_jax.flops.train_flops_per_token: 6 x matmul params over the effective depth
              plus attention counted over the full (not causal) length, the PaLM convention.
3. decode     ztt_jax.decoding.generate (KV cache, one jitted program) on the C=4 model from step 2:
              new tokens/s with exit off, and with exit on at threshold 0, where every token exits
              after min_cycles=1 (the largest saving exit can give; mean cycles are reported).

Every item checks the remaining `--budget_s` first and is recorded as skipped when the estimate
(from the compile times seen so far) would overrun it, so the run ends in time with what it has.
`--tiny` runs the same code on a tiny model with short sequences, on any backend (CPU in the tests).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ztt_step import ZttStep, make_config, token_batches  # noqa: E402
from ztt_jax.flops import datasheet_peak, peak_flops_info, train_flops_per_token  # noqa: E402

# ~1.0B unique params: 20 layers x 45.1M (attention 2.5 D^2 with 4 kv heads + SwiGLU 3 D F) + 67M
# tied embedding.
MODEL_1B = dict(variant="ztt", d_model=2048, num_heads=16, num_kv_heads=4, mlp_dim=5632, vocab_size=32768,
                n_head_layers=2, n_middle_layers=16, n_tail_layers=2, norm="rmsnorm", position="rope",
                mlp="swiglu", use_bias=False, tie_embeddings=True, dtype="bfloat16", param_dtype="float32",
                attention_impl="auto")
TOKENS_PER_STEP = 16384
MODEL_TINY = dict(MODEL_1B, d_model=64, num_heads=4, num_kv_heads=2, mlp_dim=128, vocab_size=256, n_head_layers=1,
                  n_middle_layers=2, n_tail_layers=1)


class Budget:
  """Seconds left of --budget_s, and whether a step expected to take `need` seconds still fits."""

  def __init__(self, seconds: float):
    self.t0, self.seconds = time.perf_counter(), seconds

  @property
  def left(self) -> float:
    return self.seconds - (time.perf_counter() - self.t0)

  def fits(self, need: float) -> bool:
    return need < self.left


def device_info() -> dict:
  d = jax.devices()[0]
  info = {"platform": d.platform, "device_kind": d.device_kind, "num_devices": jax.device_count(),
          "jax": jax.__version__, "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
          "python": platform.python_version(), "host": platform.node()}
  try:
    stats = d.memory_stats() or {}
    info["memory_bytes_limit"] = stats.get("bytes_limit")
  except Exception:  # CPU devices have no memory stats
    pass
  return info


def _jaxlib_version():
  try:
    import jaxlib
    return jaxlib.__version__
  except Exception:
    return None


def peak_bf16() -> dict:
  """The chip's dense bf16 peak per device: the datasheet table for known accelerators, else the
  cached measured matmul peak (ztt_jax.flops), so --tiny on CPU still reports an MFU."""
  d = jax.devices()[0]
  table = datasheet_peak(d.device_kind) if d.platform != "cpu" else None
  if table:
    return {"per_device": table, "source": f"datasheet dense bf16 ({d.device_kind})"}
  info = peak_flops_info(dtype="bfloat16")
  return {"per_device": info["total"] / max(len(jax.local_devices()), 1) if d.platform != "cpu" else info["total"],
          "source": f"measured bf16 matmul peak ({info['source']})"}


def peak_memory_bytes():
  try:
    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  except Exception:
    return None


# ------------------------------------------------------------------------------------ 1. numerics

def bench_numerics(args, budget: Budget) -> dict:
  import attention_check  # benchmarks/, on sys.path above
  check = attention_check.check_against_reference
  seq = 128 if args.tiny else 2048
  heads, head_dim = (2, 16) if args.tiny else (16, 128)
  out = {}
  for impl in ("auto", "chunked"):
    if not budget.fits(30 if not args.tiny else 5):
      out[impl] = {"skipped": f"budget ({budget.left:.0f}s left)"}
      continue
    t0 = time.perf_counter()
    try:
      r = check(impl, batch=1 if args.tiny else 2, seq_len=seq, num_heads=heads, head_dim=head_dim,
                dtype="bfloat16", block_size=64 if args.tiny else 512)
      r["seconds"] = time.perf_counter() - t0
      out[impl] = r
    except Exception as e:  # a kernel that cannot run here is a result, not a crash of the benchmark
      out[impl] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
    print(f"numerics {impl}: {json.dumps(_short_numerics(out[impl]))}", flush=True)
  return out


def _short_numerics(r: dict) -> dict:
  if "errors" not in r:
    return r
  return {"resolved": r.get("resolved"), "dtype": r.get("dtype"),
          "max_err": {k: f"{v:.2e}" for k, v in r["errors"].items()},
          "chunked_max_err": {k: f"{v:.2e}" for k, v in r.get("chunked_errors", {}).items()}}


# ------------------------------------------------------------------------------------ 2. train

def train_configs(args):
  seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else ([64, 128] if args.tiny else [2048, 8192])
  cycles = [int(c) for c in args.cycles.split(",")]
  model = MODEL_TINY if args.tiny else MODEL_1B
  tokens = 256 if args.tiny else TOKENS_PER_STEP
  for seq in seqs:
    for c in cycles:
      yield seq, c, max(1, tokens // seq), {**model, "num_cycles": c}


def bench_train(args, budget: Budget, peak: dict, keep_for_decode: dict, configs, compile_seen: list) -> list:
  rows = []
  for seq, c, batch, model in configs:
    row = {"seq_len": seq, "cycles": c, "batch": batch, "tokens_per_step": batch * seq}
    # The first compile is unknown: assume 90 s on an accelerator; later ones scale with depth.
    est = (max(compile_seen) if compile_seen else (90.0 if not args.tiny else 10.0)) * (1.5 if c > 1 else 1.0)
    if not budget.fits(est + 20):
      row["skipped"] = f"budget: {budget.left:.0f}s left, this item needs ~{est + 20:.0f}s"
      rows.append(row)
      print(f"train seq={seq} C={c}: skipped ({row['skipped']})", flush=True)
      continue
    step = None
    try:
      cfg = make_config(seq_len=seq, batch=batch, steps=1000, model=model, lr=3e-4, warmup=10)
      row.update(params=_param_count(cfg), effective_depth=cfg.model.effective_depth,
                 attention_impl=cfg.model.attention_impl,
                 resolved_attention=_resolved(cfg, seq), remat_policy=cfg.model.remat_policy)
      step = ZttStep(cfg, jax.devices()[0])
      row["init_s"] = step.init_s
      batches = token_batches(2, batch, seq, cfg.model.vocab_size, seed=seq + c)
      row["compile_s"] = step.compile(batches[0])
      compile_seen.append(row["init_s"] + row["compile_s"])
      for i in range(2):  # warm-up: first-run allocations, autotuning
        step.step(batches[i % 2])
      row["loss_after_warmup"] = step.sync()
      times = []
      for i in range(args.steps):
        t0 = time.perf_counter()
        step.step(batches[i % 2])
        row["loss"] = step.sync()  # one step at a time: the figure is a step time, not a pipeline rate
        times.append(time.perf_counter() - t0)
        if budget.left < 15:
          break
      dt = statistics.median(times)
      flops_tok = train_flops_per_token(cfg.model, seq)
      row.update(step_s=dt, step_s_all=times, tokens_per_sec=batch * seq / dt,
                 model_flops_per_token=flops_tok, model_tflops_per_sec=flops_tok * batch * seq / dt / 1e12,
                 mfu=flops_tok * batch * seq / dt / peak["per_device"], peak_memory_bytes=peak_memory_bytes())
      if c == max(int(x) for x in args.cycles.split(",")) and not keep_for_decode:
        keep_for_decode.update(model=step.run.model, params=step.state.params, seq_len=seq, cycles=c)
      print(f"train seq={seq} C={c} B={batch}: compile {row['compile_s']:.1f}s, step {dt * 1e3:.1f} ms, "
            f"{row['tokens_per_sec']:,.0f} tok/s, MFU {100 * row['mfu']:.1f}% ({row['resolved_attention']})", flush=True)
    except Exception as e:
      row["error"] = f"{type(e).__name__}: {e}"
      row["traceback"] = traceback.format_exc(limit=6)
      print(f"train seq={seq} C={c}: ERROR {row['error']}", flush=True)
    finally:
      del step
      gc.collect()
    rows.append(row)
  return rows


def _param_count(cfg) -> int:
  import flax.linen as nn
  from ztt_jax.model import ZTTModel
  from ztt_jax.model.lm import count_params
  model = ZTTModel(cfg.model)
  toks = jax.ShapeDtypeStruct((1, 8), np.int32)
  return count_params(jax.eval_shape(lambda t: nn.unbox(model.init(jax.random.key(0), t)["params"]), toks))


def _resolved(cfg, seq) -> str:
  from ztt_jax.model.attention_impls import resolve
  return resolve(cfg.model.attention_impl, seq_len=seq, dtype=cfg.model.dtype, head_dim=cfg.model.head_dim,
                 zero_slot=cfg.model.use_zero_token)


# ------------------------------------------------------------------------------------ 3. decode

def generate_call(model, params, prompt, new_tokens: int, threshold):
  """ztt_jax.decoding.generate, greedy, with exit off (threshold None) or on at `threshold`."""
  from ztt_jax import decoding
  from ztt_jax.model.exit import ExitRule
  rule = None if threshold is None else ExitRule.from_config(model.cfg, threshold=threshold)
  return decoding.generate(model, params, prompt, max_new_tokens=new_tokens, rule=rule,
                           sampling=decoding.Sampling(temperature=0.0))


def bench_decode(args, budget: Budget, kept: dict) -> dict:
  if "params" not in kept:
    return {"skipped": "no trained model to decode with (the train items were skipped or failed)"}
  model, params = kept["model"], kept["params"]
  B, P, N = (2, 8, 8) if args.tiny else (8, 128, 256)
  prompt = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (B, P)).astype(np.int32)
  out = {"batch": B, "prompt_len": P, "new_tokens": N, "cycles": model.cfg.cycles,
         "model_seq_len": kept["seq_len"]}
  for name, tau in (("exit_off", None), ("exit_on_tau0", 0.0)):
    if not budget.fits(60 if not args.tiny else 5):
      out[name] = {"skipped": f"budget ({budget.left:.0f}s left)"}
      continue
    try:
      t0 = time.perf_counter()
      generate_call(model, params, prompt, N, tau)  # compiles (one program per exit on/off)
      first = time.perf_counter() - t0
      t0 = time.perf_counter()
      g = generate_call(model, params, prompt, N, tau)
      dt = time.perf_counter() - t0
      n_new = int(g.num_new)
      cyc = np.asarray(g.step_cycles)[:, :n_new]
      out[name] = {"threshold": tau, "compile_and_first_s": first, "seconds": dt, "new_tokens": n_new,
                   "tokens_per_sec": B * n_new / dt, "mean_cycles": float(cyc[cyc > 0].mean()) if (cyc > 0).any() else 0.0}
      print(f"decode {name}: {out[name]['tokens_per_sec']:,.0f} new tok/s (B={B}), mean cycles "
            f"{out[name]['mean_cycles']:.2f}/{model.cfg.cycles}, first call {first:.1f}s", flush=True)
    except Exception as e:
      out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}
      print(f"decode {name}: ERROR {out[name]['error']}", flush=True)
  if all("tokens_per_sec" in out.get(k, {}) for k in ("exit_off", "exit_on_tau0")):
    out["speedup_exit_on"] = out["exit_on_tau0"]["tokens_per_sec"] / out["exit_off"]["tokens_per_sec"]
  return out


# ------------------------------------------------------------------------------------ report

def print_table(res: dict) -> None:
  d = res["device"]
  print(f"\n{d['device_kind']} ({d['platform']}), jax {d['jax']}; peak {res['peak']['per_device'] / 1e12:.1f} "
        f"TFLOP/s ({res['peak']['source']})")
  hdr = f"{'seq':>6} {'C':>2} {'B':>3} {'params':>8} {'attention':>10} {'compile s':>9} {'step ms':>9} {'tok/s':>10} {'MFU':>6}"
  print(hdr)
  print("-" * len(hdr))
  for r in res["train"]:
    if "step_s" in r:
      print(f"{r['seq_len']:>6} {r['cycles']:>2} {r['batch']:>3} {r['params'] / 1e9:>7.2f}B {r['resolved_attention']:>10} "
            f"{r['compile_s']:>9.1f} {r['step_s'] * 1e3:>9.1f} {r['tokens_per_sec']:>10,.0f} {100 * r['mfu']:>5.1f}%")
    else:
      print(f"{r['seq_len']:>6} {r['cycles']:>2} {r['batch']:>3}  {r.get('skipped') or r.get('error')}")
  dec = res.get("decode", {})
  for k in ("exit_off", "exit_on_tau0"):
    if isinstance(dec.get(k), dict) and "tokens_per_sec" in dec[k]:
      print(f"decode {k:13s} {dec[k]['tokens_per_sec']:>10,.0f} new tok/s, mean cycles {dec[k]['mean_cycles']:.2f}")
  for impl, r in res.get("numerics", {}).items():
    if isinstance(r, dict) and "errors" in r:
      print(f"numerics {impl} -> {r['resolved']}: " + ", ".join(f"{k} {v:.1e}" for k, v in r["errors"].items()))
    elif isinstance(r, dict):
      print(f"numerics {impl}: {r.get('skipped') or r.get('error')}")


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--json", default=None, help="write the results here")
  ap.add_argument("--budget_s", type=float, default=400.0, help="stop starting new items after this")
  ap.add_argument("--steps", type=int, default=5, help="timed train steps per configuration")
  ap.add_argument("--seqs", default=None, help="comma-separated sequence lengths (default 2048,8192)")
  ap.add_argument("--cycles", default="1,4", help="comma-separated cycle counts")
  ap.add_argument("--skip", default="", help="comma-separated items to skip: numerics,train,decode")
  ap.add_argument("--tiny", action="store_true", help="a tiny model and short sequences (CPU smoke test)")
  args = ap.parse_args(argv)
  if args.tiny:
    args.steps = min(args.steps, 2)
  budget = Budget(args.budget_s)
  skip = set(filter(None, args.skip.split(",")))
  res = {"argv": list(sys.argv[1:] if argv is None else argv), "tiny": args.tiny, "device": device_info(),
         "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
  res["peak"] = peak_bf16()
  print(f"device {res['device']['device_kind']} ({res['device']['platform']}), jax {jax.__version__}, "
        f"peak {res['peak']['per_device'] / 1e12:.2f} TFLOP/s [{res['peak']['source']}], budget {args.budget_s:.0f}s",
        flush=True)
  res["numerics"] = {} if "numerics" in skip else bench_numerics(args, budget)
  # Order: the shortest sequence (both cycle counts), then decoding with its C=max model, then the
  # longer sequences: if the budget runs short, what is lost is the costliest item, not a kind.
  kept, compile_seen = {}, []
  configs = list(train_configs(args))
  first_seq = min(c[0] for c in configs) if configs else None
  res["train"] = []
  if "train" not in skip:
    res["train"] += bench_train(args, budget, res["peak"], kept, [c for c in configs if c[0] == first_seq], compile_seen)
  res["decode"] = {"skipped": "--skip"} if "decode" in skip else bench_decode(args, budget, kept)
  kept.clear()  # frees the decode model's params before the long sequences
  kept["done"] = True
  if "train" not in skip:
    res["train"] += bench_train(args, budget, res["peak"], kept, [c for c in configs if c[0] != first_seq], compile_seen)
  res["seconds"] = time.perf_counter() - budget.t0
  print_table(res)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(res, f, indent=1, default=_json_default)
    print(f"wrote {args.json}")
  return res


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return str(x)


if __name__ == "__main__":
  main()

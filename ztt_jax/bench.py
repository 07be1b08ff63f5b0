"""Speed benchmarks; each figure is a ratio of two measurements taken in the same run.

  python -m ztt_jax.bench [--suite=throughput,compile,exit,remat,mfu] [--json=PATH] [--quick] [--merge]

Suites:
  throughput  train-step tokens/s and MFU, ztt vs vanilla at equal effective depth and width (target >= 0.95)
  compile     fwd+bwd compile time vs num_cycles in {2,4,8,16,32} (target C=32/C=2 <= 1.5); forward
              alone at C=2 and 32
  exit        forward speedup vs the cycles actually run, on the real-skip path (the masked, where
              path for comparison); cached-decoding speedup (ztt_jax.bench_decode)
  remat       XLA's memory analysis of the compiled train step under each remat policy
  mfu         train-step MFU at d_model 512, 8 effective layers, seq 512, vs this CPU's measured matmul peak

Timings alternate between the two sides of a ratio, so a noisy neighbour slows both alike.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ztt_jax import bench_decode
from ztt_jax.config import base_config, parse
from ztt_jax.flops import cpu_model, measured_cpu_matmul_peak, peak_flops, train_flops_per_token
from ztt_jax.model import ExitRule, ModelConfig, ZTTModel
from ztt_jax.partitioning import to_global
from ztt_jax.run import build, jit_train_step

SUITES = ("throughput", "compile", "exit", "remat", "mfu")


# ------------------------------------------------------------------ shared helpers

def abstract_params(model, toks):
  return jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), toks)["params"]))


def compile_seconds(cfg, toks, grad):
  """Wall time of lowering + compiling the forward (or its gradient) for abstract params."""
  model = ZTTModel(cfg)
  params = abstract_params(model, toks)

  def fwd(p, t):
    logits, aux = model.apply({"params": p}, t, ExitRule(threshold=0.5))
    return jnp.mean(logits) + jnp.mean(aux["zero_attention"])

  fn = jax.grad(fwd) if grad else fwd
  t0 = time.perf_counter()
  jax.jit(fn).lower(params, toks).compile()
  return time.perf_counter() - t0


def timed(f, *args, n):
  """Median wall time of n calls after one warm-up call."""
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def interleaved(fns: dict, n: int) -> dict:
  """Median time of each zero-arg callable, calls interleaved round-robin (after one warm-up each)."""
  for f in fns.values():
    jax.block_until_ready(f())
  ts = {k: [] for k in fns}
  for _ in range(n):
    for k, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      ts[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in ts.items()}


# ------------------------------------------------------------------ train-step harness

def experiment_config(seq_len: int, batch: int, **model):
  cfg = base_config()
  cfg.model.update(dict(max_seq_len=max(seq_len, 64), cycle_loss_weight=0.0, exit_threshold=None, **model))
  cfg.data.seq_len = seq_len
  cfg.train.global_batch_size = batch
  cfg.log.tensorboard = False
  return parse(cfg)


class TrainStep:
  """A ready train step on a synthetic batch, built by the trainer's own code path."""

  def __init__(self, cfg, devices=None):
    self.cfg = cfg
    self.run = build(cfg, devices)
    self.fn = jit_train_step(self.run)
    B, T, V = cfg.train.global_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 256, (B, T + 1)).astype(np.int32)
    local = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": np.ones((B, T), np.float32)}
    with self._ctx():
      self.batch = to_global(local, self.run.mesh)
      self.state = self.run.init(jax.random.key(0))

  def _ctx(self):
    import contextlib
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.run.mesh))
    stack.enter_context(nn.logical_axis_rules(self.run.axis_rules))
    return stack

  def __call__(self):
    with self._ctx():
      self.state, metrics = self.fn(self.state, self.batch)
    return metrics["loss"]

  @property
  def tokens(self) -> int:
    return self.cfg.train.global_batch_size * self.cfg.data.seq_len

  @property
  def flops(self) -> float:
    return train_flops_per_token(self.cfg.model, self.cfg.data.seq_len) * self.tokens

  def memory(self) -> dict:
    with self._ctx():
      m = self.fn.lower(self.run.abstract_state, self.batch).compile().memory_analysis()
    d = {k: int(getattr(m, k)) for k in ("temp_size_in_bytes", "argument_size_in_bytes",
                                         "output_size_in_bytes", "alias_size_in_bytes")}
    # donated state aliases the output, so it is counted once
    d["peak_bytes"] = (d["argument_size_in_bytes"] + d["output_size_in_bytes"] - d["alias_size_in_bytes"]
                       + d["temp_size_in_bytes"])
    return d


# ------------------------------------------------------------------ suites

def suite_throughput(q):
  d, T, B = (64, 64, 8) if q else (128, 128, 8)
  width = dict(d_model=d, num_heads=4, mlp_dim=3 * d)
  ztt = experiment_config(T, B, variant="ztt", n_head_layers=1, n_middle_layers=2, n_tail_layers=1,
                          num_cycles=3, **width)
  van = experiment_config(T, B, variant="vanilla", n_head_layers=1, n_middle_layers=6, n_tail_layers=1,
                          num_cycles=1, **width)
  # htc (same cycling, no zero token) splits any gap into cycling cost and zero-token cost
  htc = experiment_config(T, B, variant="head_tail_cycling", n_head_layers=1, n_middle_layers=2,
                          n_tail_layers=1, num_cycles=3, **width)
  steps = {"ztt": TrainStep(ztt), "htc": TrainStep(htc), "vanilla": TrainStep(van)}
  t = interleaved(steps, n=5 if q else 10)
  peak = peak_flops()
  rows = {}
  for k, s in steps.items():
    rows[k] = {"step_s": t[k], "tokens_per_sec": s.tokens / t[k], "mfu": s.flops / t[k] / peak,
               "effective_depth": s.cfg.model.effective_depth}
  return {"shape": dict(d_model=d, seq_len=T, batch=B, effective_depth=8), "peak_flops": peak, **rows,
          "ratio": rows["ztt"]["tokens_per_sec"] / rows["vanilla"]["tokens_per_sec"],
          "htc_over_vanilla": rows["htc"]["tokens_per_sec"] / rows["vanilla"]["tokens_per_sec"], "target": ">= 0.95"}


def suite_compile(q):
  width = 64 if q else 128
  toks = jnp.zeros((4, 64), jnp.int32)
  cycles = (2, 4, 8, 16, 32)
  times = {}
  for C in cycles:
    # a distinct vocab per C defeats any compilation cache
    cfg = ModelConfig(d_model=width, num_heads=4, mlp_dim=4 * width, num_cycles=C, vocab_size=256 + C)
    times[C] = compile_seconds(cfg, toks, grad=True)
  forward = {C: compile_seconds(ModelConfig(d_model=width, num_heads=4, mlp_dim=4 * width, num_cycles=C,
                                            vocab_size=512 + C), toks, grad=False) for C in (2, 32)}
  return {"what": "jit(grad(forward)).lower().compile(), ztt 1+2xC+1 layers", "d_model": width,
          "seconds": {str(C): s for C, s in times.items()},
          "forward_seconds": {str(C): s for C, s in forward.items()}, "forward_ratio": forward[32] / forward[2],
          "ratio": times[32] / times[2], "target": "<= 1.5"}


def suite_exit(q):
  d, T, B, C = (64, 64, 8, 8) if q else (128, 128, 8, 8)
  cfg = ModelConfig(d_model=d, num_heads=4, mlp_dim=4 * d, num_cycles=C, vocab_size=256, max_seq_len=T)
  model = ZTTModel(cfg)
  toks = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
  params = jax.jit(lambda k: nn.unbox(model.init(k, toks)["params"]))(jax.random.key(0))

  # tau=-1 makes every token exit as soon as min_cycles allows, so exactly k cycles run. Both sides
  # return the logits: returning only cycles_used would let XLA drop the read-out from one side.
  def fwd(k):
    def f(p, t):
      logits, aux = model.apply({"params": p}, t, ExitRule(threshold=-1.0, min_cycles=k, skip_exited=True))
      return logits, aux["cycles_used"]
    f = jax.jit(f)
    return lambda: f(params, toks)

  # Baseline: the same skip path with a threshold no a0 reaches, so only the exits differ.
  skip_none = jax.jit(lambda p, t: model.apply({"params": p}, t, ExitRule(threshold=2.0, skip_exited=True))[0])
  plain = jax.jit(lambda p, t: model.apply({"params": p}, t, None)[0])  # no exit machinery at all
  # Every token exits after 1 cycle but every cycle still runs, masked: what skipping saves.
  where = jax.jit(lambda p, t: model.apply({"params": p}, t, ExitRule(threshold=-1.0))[0])
  ks = (1, 2, 4, 8)
  fns = {"full": lambda: skip_none(params, toks), "plain": lambda: plain(params, toks),
         "where": lambda: where(params, toks), **{k: fwd(k) for k in ks}}
  t = interleaved(fns, n=5 if q else 10)
  rows = [{"cycles_run": k, "mean_cycles": float(jnp.mean(fns[k]()[1])), "ms": 1e3 * t[k],
           "speedup": t["full"] / t[k]} for k in ks]
  out = {"shape": dict(d_model=d, seq_len=T, batch=B, num_cycles=C), "full_ms": 1e3 * t["full"],
         "plain_no_exit_ms": 1e3 * t["plain"], "where_exit_after_1_ms": 1e3 * t["where"],
         "forward": rows, "ratio": rows[0]["speedup"],
         "ratio_is": "forward time, skip path: no token exits / every token exits after 1 of 8 cycles"}
  try:
    out["decode"] = _decode_bench(q)
  except Exception as e:  # noqa: BLE001 - a failed decode half keeps the forward figures
    out["decode"] = {"skipped": f"bench_decode failed: {type(e).__name__}: {e}"}
  return out


def _decode_bench(q):
  """Cached-decoding speedup of a random 8-cycle ZTT (2x new_tokens must fit its cache)."""
  r = bench_decode.measure(new_tokens=32 if q else 64, repeats=2 if q else 3)
  if not r["ratio"] > 0:
    # measure times n steps as t(2n) - t(n); a busy CPU can make that difference negative
    r["unreliable"] = "non-positive decode-time difference (CPU contention); rerun on a quiet machine"
  r["ratio_is"] = "decode tokens/s at the threshold halving mean cycles / exit off"
  return r


def suite_remat(q):
  d, T, B = (64, 128, 8) if q else (128, 256, 8)
  rows = {}
  for policy in ("none", "dots_with_no_batch_dims_saveable", "nothing_saveable"):
    cfg = experiment_config(T, B, variant="ztt", d_model=d, num_heads=4, mlp_dim=4 * d, num_cycles=4,
                            remat_policy=policy)
    rows[policy] = TrainStep(cfg).memory()
  base = rows["none"]["peak_bytes"]
  return {"shape": dict(d_model=d, seq_len=T, batch=B, variant="ztt 1+2x4+1"), "policies": rows,
          "ratio": {p: r["peak_bytes"] / base for p, r in rows.items()}, "ratio_is": "peak / peak(none)"}


def suite_mfu(q):
  d, T, B, n = (256, 256, 1, 2) if q else (512, 512, 2, 3)
  cfg = experiment_config(T, B, variant="ztt", d_model=d, num_heads=8, mlp_dim=4 * d, n_head_layers=1,
                          n_middle_layers=2, n_tail_layers=1, num_cycles=3)
  step = TrainStep(cfg)
  peak_before = _fresh_peak()
  t = interleaved({"step": step}, n=n)["step"]
  peak_after = _fresh_peak()
  peak = max(peak_before, peak_after)  # the best the contended CPU showed around the measurement
  return {"shape": dict(d_model=d, seq_len=T, batch=B, effective_depth=cfg.model.effective_depth,
                        variant="ztt 1+2x3+1"),
          "step_s": t, "tokens_per_sec": step.tokens / t, "model_flops_per_step": step.flops,
          "achieved_flops": step.flops / t, "peak_flops": peak,
          "peak_flops_samples": [peak_before, peak_after], "ratio": step.flops / t / peak,
          "ratio_is": "MFU (train FLOPs / s over measured float32 matmul peak)"}


def _fresh_peak():
  measured_cpu_matmul_peak.cache_clear()
  return measured_cpu_matmul_peak()


RUNNERS = {"throughput": suite_throughput, "compile": suite_compile, "exit": suite_exit,
           "remat": suite_remat, "mfu": suite_mfu}


# ------------------------------------------------------------------ output

def headline(name, r) -> str:
  if name == "throughput":
    return (f"ztt {r['ztt']['tokens_per_sec']:,.0f} tok/s (MFU {100 * r['ztt']['mfu']:.1f}%) vs vanilla "
            f"{r['vanilla']['tokens_per_sec']:,.0f} tok/s (MFU {100 * r['vanilla']['mfu']:.1f}%); "
            f"htc/vanilla {r['htc_over_vanilla']:.3f}")
  if name == "compile":
    return ("  ".join(f"C={c}: {s:.2f}s" for c, s in r["seconds"].items())
            + f"  | forward C32/C2 {r['forward_ratio']:.2f}")
  if name == "exit":
    s = "  ".join(f"{x['cycles_run']}/8: {x['speedup']:.2f}x" for x in r["forward"])
    s += f"  (1/8 masked, no skip: {r['full_ms'] / r['where_exit_after_1_ms']:.2f}x)"
    if isinstance(r.get("decode"), dict) and "ratio" in r["decode"]:
      s += f"  | decode {r['decode']['ratio']:.2f}x at {r['decode']['mean_cycles']:.2f}/{r['decode']['cycles']} cycles"
    return s
  if name == "remat":
    return "  ".join(f"{p}: {v['peak_bytes'] / 2**20:.1f} MiB" for p, v in r["policies"].items())
  if name == "mfu":
    return (f"{r['tokens_per_sec']:,.0f} tok/s, {r['achieved_flops'] / 1e9:.1f} GFLOP/s of "
            f"{r['peak_flops'] / 1e9:.1f} peak")
  return ""


def ratio_text(r) -> str:
  v = r["ratio"]
  if isinstance(v, dict):
    return ", ".join(f"{k.split('_')[0]} {x:.2f}" for k, x in v.items())
  return f"{v:.3f}"


def host_info() -> dict:
  return {"jax": jax.__version__, "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
          "devices": jax.device_count(), "cpus": os.cpu_count(), "machine": platform.machine(),
          "processor": cpu_model(), "load_avg_at_start": os.getloadavg()}


def run_suites(suites, json_path: str, *, quick: bool = False, merge: bool = False) -> dict:
  """Runs `suites` in order, printing a line each and rewriting `json_path` after every one (a long
  run keeps what it measured); merge keeps the other suites already in json_path."""
  out = {"host": host_info(), "quick": quick, "suites": {}}
  print(f"jax {jax.__version__} on {out['host']['platform']} x{out['host']['devices']}, "
        f"cpus={out['host']['cpus']}, load {out['host']['load_avg_at_start'][0]:.1f}", flush=True)
  print(f"{'suite':11s} {'ratio':>28s}  detail", flush=True)
  if merge and os.path.isfile(json_path):
    with open(json_path) as f:
      out["suites"] = json.load(f).get("suites", {})
  for name in suites:
    t0 = time.perf_counter()
    r = RUNNERS[name](quick)
    r["suite_wall_s"] = time.perf_counter() - t0
    r["load_avg"] = os.getloadavg()
    out["suites"][name] = r
    print(f"{name:11s} {ratio_text(r):>28s}  {headline(name, r)}", flush=True)
    with open(json_path, "w") as f:
      json.dump(out, f, indent=1)
  print(f"wrote {json_path}")
  return out


def main(argv):
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f"unexpected argument(s) {argv[1:]}; every option is a --flag (--helpshort lists them)")
  f = flags.FLAGS
  unknown = sorted(set(f.suite) - set(SUITES))
  if unknown or not f.suite:
    raise app.UsageError(f"--suite={','.join(f.suite)}: unknown suite(s) {unknown}; choose from {','.join(SUITES)}")
  return run_suites(f.suite, f.json, quick=f.quick, merge=f.merge)


def _define_flags():
  from absl import flags
  flags.DEFINE_list("suite", list(SUITES), "Comma-separated subset of " + ",".join(SUITES) + ".")
  flags.DEFINE_string("json", "bench.json", "Where to write the results.")
  flags.DEFINE_bool("quick", False, "Smaller shapes and fewer repeats.")
  flags.DEFINE_bool("merge", False, "Keep the other suites already in --json (rerun some).")


if __name__ == "__main__":
  from ztt_jax import cli
  _define_flags()
  cli.run(main)

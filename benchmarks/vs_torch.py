"""ztt_jax against the same decoder written in PyTorch, trained side by side on CPU.

  .venv/bin/python benchmarks/vs_torch.py [--data=/work/shared/data/tinyshakespeare.txt] [--json=FILE]
      [--rows=baby,d256,ztt] [--rounds=7] [--window_s=2.0] [--remat=POLICY] [--quick]

Both sides are GPT-2 form: pre-norm LayerNorm blocks, learned positions, tanh-GELU MLP, biases on
every projection, tied embeddings, AdamW (b2 0.95, decay on matrices and embeddings only) with
global-norm clipping at 1.0 and the same warmup + cosine learning rate. The torch model is written
here; ztt_jax's side is its real jitted train step (`build` + `jit_train_step`, the trainer's path,
with its finite-step guard and metrics) on `variant=vanilla, norm=layernorm, position=learned,
mlp=gelu, use_bias=True, tie_embeddings=True`, all layers in one scanned stack.

The torch model starts from a copy of ztt_jax's initial params, so the two compute the same
function: the first step's loss of each (before any update) is printed and must agree to ~1e-6,
and the parameter counts must be equal. Both see the same batches in the same order.

Rows (shape: layers, d_model, heads, MLP, T, batch):
  baby       4, 128, 4, 512, 64, 12     nanoGPT's "baby GPT" (shakespeare_char)
  d256       6, 256, 4, 1024, 256, 16; plus ztt_jax with model.dtype=bfloat16 (params float32) in
             the same alternation, same seed and batches: its speed and its loss after the same steps
  ztt        ztt 1 + 2x3 + 1 layers at the baby shape; torch loops its shared middle stack the
             same way, zero slot included (a per-(cycle, layer) zero key concatenated in front of
             the keys, value 0, never masked), so both do the same compute.

Timing: per row, the frameworks alternate in windows of the same number of steps (A B, B A, ...,
`--rounds` of each); the table gives the median tokens/s of each side's windows and their ratio.
The d256 row's two ztt_jax steps (float32, bfloat16) alternate with torch, so all three see the
same machine. On a shared machine read the ratios, not the absolute figures, and look at the load.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import jax  # noqa: E402

from ztt_step import ZttStep, make_config, token_batches  # noqa: E402
from ztt_jax.flops import cpu_model, peak_flops_info, train_flops_per_token  # noqa: E402
from ztt_jax.model.lm import count_params  # noqa: E402
from ztt_jax.optimizer import lr_schedule  # noqa: E402

VOCAB = 264  # byte-level: 256 bytes + PAD/BOS/EOS, rounded as ztt_jax's default
SHAPES = {
    "baby": dict(layers=4, d=128, heads=4, mlp=512, T=64, B=12),
    "d256": dict(layers=6, d=256, heads=4, mlp=1024, T=256, B=16),
    "tiny": dict(layers=2, d=32, heads=2, mlp=64, T=16, B=4),  # tests only
}
ROWS = {
    # name: (shape, ztt_jax variant layout, extra ztt_jax dtype row)
    "baby": ("baby", "vanilla", None),
    "d256": ("d256", "vanilla", "bfloat16"),
    "d256_f32": ("d256", "vanilla", None),
    "ztt": ("baby", "ztt", None),
    "tiny": ("tiny", "vanilla", None),
    "tiny_ztt": ("tiny", "ztt", None),
}
GPT2_FORM = dict(norm="layernorm", position="learned", mlp="gelu", use_bias=True, tie_embeddings=True)
ZTT_LAYOUT = dict(n_head_layers=1, n_middle_layers=2, n_tail_layers=1, num_cycles=3)


# ------------------------------------------------------------------------------------ torch model

class TorchBlock(torch.nn.Module):
  """Pre-norm GPT-2 block; c_attn packs q | k | v (head-major inside each), as GPT-2 does."""

  def __init__(self, d, heads, mlp):
    super().__init__()
    self.heads = heads
    self.ln_1 = torch.nn.LayerNorm(d, eps=1e-5)
    self.c_attn = torch.nn.Linear(d, 3 * d)
    self.c_proj = torch.nn.Linear(d, d)
    self.ln_2 = torch.nn.LayerNorm(d, eps=1e-5)
    self.c_fc = torch.nn.Linear(d, mlp)
    self.mlp_proj = torch.nn.Linear(mlp, d)

  def forward(self, x_BxTxD, zero_key_HxK=None):
    B, T, D = x_BxTxD.shape
    H, K = self.heads, D // self.heads
    q, k, v = self.c_attn(self.ln_1(x_BxTxD)).split(D, dim=2)
    q, k, v = (t.view(B, T, H, K).transpose(1, 2) for t in (q, k, v))  # [B, H, T, K]
    if zero_key_HxK is None:
      o_BxHxTxK = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
      # The zero slot as one more key in front: learned key, zero value, visible to every query.
      k = torch.cat([zero_key_HxK[None, :, None, :].expand(B, H, 1, K), k], dim=2)
      v = torch.cat([v.new_zeros(B, H, 1, K), v], dim=2)
      visible_TxS = torch.ones(T, T + 1, dtype=torch.bool).tril(diagonal=1)
      o_BxHxTxK = F.scaled_dot_product_attention(q, k, v, attn_mask=visible_TxS)
    x_BxTxD = x_BxTxD + self.c_proj(o_BxHxTxK.transpose(1, 2).reshape(B, T, D))
    return x_BxTxD + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x_BxTxD)), approximate="tanh"))


class TorchLM(torch.nn.Module):
  """head blocks -> middle blocks x cycles (shared params, zero key per cycle and layer) -> tail blocks.
  vanilla: no head or tail, one cycle, no zero slot."""

  def __init__(self, *, vocab, max_len, d, heads, mlp, n_head, n_middle, n_tail, cycles, zero_token):
    super().__init__()
    self.cycles = cycles
    self.wte = torch.nn.Embedding(vocab, d)
    self.wpe = torch.nn.Embedding(max_len, d)
    self.head = torch.nn.ModuleList(TorchBlock(d, heads, mlp) for _ in range(n_head))
    self.middle = torch.nn.ModuleList(TorchBlock(d, heads, mlp) for _ in range(n_middle))
    self.tail = torch.nn.ModuleList(TorchBlock(d, heads, mlp) for _ in range(n_tail))
    self.ln_f = torch.nn.LayerNorm(d, eps=1e-5)
    self.zero_key_pool = (torch.nn.Parameter(torch.zeros(cycles, n_middle, heads, d // heads))
                          if zero_token else None)

  def forward(self, idx_BxT):
    T = idx_BxT.shape[1]
    x = self.wte(idx_BxT) + self.wpe.weight[:T]
    for blk in self.head:
      x = blk(x)
    for c in range(self.cycles):
      for l, blk in enumerate(self.middle):
        x = blk(x, None if self.zero_key_pool is None else self.zero_key_pool[c, l])
    for blk in self.tail:
      x = blk(x)
    return self.ln_f(x) @ self.wte.weight.T  # tied LM head


def load_ztt_params(tm: TorchLM, params) -> None:
  """Copies ztt_jax's params (numpy tree) into the torch model, so both start identical."""
  t = lambda a: torch.from_numpy(np.array(a, np.float32))  # a writable copy

  def block(b: TorchBlock, p, i):
    g = lambda *path: np.asarray(_get(p, path))[i]
    b.ln_1.weight.data, b.ln_1.bias.data = t(g("attn_norm", "scale")), t(g("attn_norm", "bias"))
    b.ln_2.weight.data, b.ln_2.bias.data = t(g("mlp_norm", "scale")), t(g("mlp_norm", "bias"))
    D = g("attn", "q_kernel").shape[0]
    qkv_Dx3D = np.concatenate([g("attn", f"{n}_kernel").reshape(D, -1) for n in "qkv"], axis=1)
    b.c_attn.weight.data = t(qkv_Dx3D.T)  # torch Linear stores [out, in]
    b.c_attn.bias.data = t(np.concatenate([g("attn", f"{n}_bias").reshape(-1) for n in "qkv"]))
    b.c_proj.weight.data = t(g("attn", "o_kernel").reshape(-1, D).T)
    b.c_proj.bias.data = t(g("attn", "o_bias"))
    b.c_fc.weight.data, b.c_fc.bias.data = t(g("mlp", "wi_kernel").T), t(g("mlp", "wi_bias"))
    b.mlp_proj.weight.data, b.mlp_proj.bias.data = t(g("mlp", "wo_kernel").T), t(g("mlp", "wo_bias"))

  tm.wte.weight.data = t(params["embed"]["embedding"])
  tm.wpe.weight.data = t(params["embed"]["pos_embedding"])
  tm.ln_f.weight.data, tm.ln_f.bias.data = t(params["final_norm"]["scale"]), t(params["final_norm"]["bias"])
  for stack in ("head", "middle", "tail"):
    for i, b in enumerate(getattr(tm, stack)):
      block(b, params[stack]["layers"], i)
  if tm.zero_key_pool is not None:
    tm.zero_key_pool.data = t(params["zero_key_pool"])


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


class TorchStep:
  """The torch train step: forward, mean token cross-entropy, backward, clip, AdamW."""

  def __init__(self, model: TorchLM, lrs, cfg_train, fused: bool):
    self.model, self.lrs, self.i = model, lrs, 0
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("zero_")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.startswith("zero_"))]
    self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg_train.weight_decay},
                                  {"params": rest, "weight_decay": 0.0}],
                                 lr=float(lrs[0]), betas=(cfg_train.b1, cfg_train.b2), eps=1e-8, fused=fused)
    self.clip = cfg_train.grad_clip_norm
    self.loss = None

  def step(self, batch) -> None:
    idx = torch.from_numpy(batch["inputs"]).long()
    tgt = torch.from_numpy(batch["targets"]).long()
    logits = self.model(idx)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.view(-1))
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    if self.clip > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    for g in self.opt.param_groups:  # the same schedule as optax's, indexed by the update count
      g["lr"] = float(self.lrs[min(self.i, len(self.lrs) - 1)])
    self.opt.step()
    self.i += 1
    self.loss = loss.detach()

  def sync(self) -> float:
    return float(self.loss)


# ------------------------------------------------------------------------------------ one row

def build_row(name, args, batches_cache):
  shape_name, layout, dtype = ROWS[name]
  s = SHAPES[shape_name]
  model = dict(variant="vanilla", d_model=s["d"], num_heads=s["heads"], mlp_dim=s["mlp"], vocab_size=VOCAB,
               n_head_layers=0, n_middle_layers=s["layers"], n_tail_layers=0, num_cycles=1,
               remat_policy=args.remat, **GPT2_FORM)
  if layout == "ztt":
    model.update(variant="ztt", **ZTT_LAYOUT)
  cfgs = {"ztt_jax": make_config(seq_len=s["T"], batch=s["B"], steps=args.nominal_steps, model=model, seed=0)}
  if dtype:
    cfgs[f"ztt_jax_{dtype}"] = make_config(seq_len=s["T"], batch=s["B"], steps=args.nominal_steps,
                                           model={**model, "dtype": dtype}, seed=0)
  key = shape_name
  if key not in batches_cache:
    batches_cache[key] = token_batches(args.num_batches, s["B"], s["T"], VOCAB, data_path=args.data, seed=0)
  batches = batches_cache[key]

  runners, info = {}, {"row": name, "shape": s, "layout": layout}
  compile_s = {}
  for rname, cfg in cfgs.items():
    runners[rname] = ZttStep(cfg, jax.devices("cpu")[0])
    compile_s[rname] = runners[rname].compile(batches[0])
  zcfg = cfgs["ztt_jax"]
  mc = zcfg.model
  tm = TorchLM(vocab=VOCAB, max_len=mc.max_seq_len, d=mc.d_model, heads=mc.num_heads, mlp=mc.mlp_dim,
               n_head=mc.unique_head_layers, n_middle=mc.stack_layers, n_tail=mc.unique_tail_layers,
               cycles=mc.cycles, zero_token=mc.use_zero_token)
  params = runners["ztt_jax"].params_numpy()
  load_ztt_params(tm, params)
  lr_fn = lr_schedule(zcfg.train)
  lrs = np.asarray([float(lr_fn(i)) for i in range(args.nominal_steps)])
  runners = {"torch": TorchStep(tm, lrs, zcfg.train, fused=args.torch_fused), **runners}
  n_torch = sum(p.numel() for p in tm.parameters())
  n_jax = count_params(params)
  if n_torch != n_jax:
    raise AssertionError(f"row {name}: torch has {n_torch} params, ztt_jax {n_jax}; the models differ")
  info.update(params=n_jax, compile_s=compile_s,
              xla_cost=runners["ztt_jax"].cost_analysis(),
              model_flops_per_token=train_flops_per_token(mc, s["T"]),
              effective_depth=mc.effective_depth, remat_policy=mc.remat_policy)
  return runners, batches, info


def time_row(runners, batches, info, args):
  """Warm-up, calibrate one window length for all, then alternate timed windows."""
  tokens_per_step = info["shape"]["B"] * info["shape"]["T"]
  cursor = {k: 0 for k in runners}  # every runner walks the same batch list in the same order

  def run(k, n):
    r = runners[k]
    for _ in range(n):
      r.step(batches[cursor[k] % len(batches)])
      cursor[k] += 1
    return r.sync()

  loss0 = {}
  for k in runners:  # the first step's loss is computed before its update: same params, same batch
    loss0[k] = run(k, 1)
  for k in runners:
    run(k, args.warmup_steps)
  torch_threads = {}
  if args.threads == "best":
    # OpenMP with one thread per core degrades badly when anything else wants a core (every
    # parallel region waits at a barrier for a descheduled thread); give torch its faster setting.
    for n_threads in sorted({1, _cores()}, reverse=True):
      torch.set_num_threads(n_threads)
      run("torch", 1)
      t0 = time.perf_counter()
      run("torch", 3)
      torch_threads[n_threads] = (time.perf_counter() - t0) / 3
    torch.set_num_threads(min(torch_threads, key=torch_threads.get))
    for k in runners:  # the same number of steps on every side, for the loss comparison
      run(k, cursor["torch"] - cursor[k])
  per_step = {}
  for k in runners:
    t0 = time.perf_counter()
    run(k, 2)
    per_step[k] = (time.perf_counter() - t0) / 2
  n = max(2, math.ceil(args.window_s / max(per_step.values())))
  windows = {k: [] for k in runners}
  names = list(runners)
  for r in range(args.rounds):
    order = names if r % 2 == 0 else names[::-1]  # A B, B A, ...: neither side always goes first
    for k in order:
      t0 = time.perf_counter()
      run(k, n)
      windows[k].append(n * tokens_per_step / (time.perf_counter() - t0))
  final_loss = {k: runners[k].sync() for k in runners}
  steps_done = {k: cursor[k] for k in runners}
  assert len(set(steps_done.values())) == 1, steps_done
  return {"torch_threads": torch.get_num_threads(), "torch_threads_tried_step_s": torch_threads,
          "window_steps": n, "steps": steps_done["torch"], "loss0": loss0, "final_loss": final_loss,
          "tokens_per_sec": {k: statistics.median(v) for k, v in windows.items()},
          "tokens_per_sec_windows": windows}


# ------------------------------------------------------------------------------------ report

def _cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def thread_report() -> dict:
  cores = _cores()
  return {
      "cores_usable": cores, "cpu_count": os.cpu_count(), "cpu_model": cpu_model(),
      "torch": {"version": torch.__version__, "num_threads": torch.get_num_threads(),
                "num_interop_threads": torch.get_num_interop_threads(),
                "parallel_backend": "OpenMP" if torch.backends.openmp.is_available() else "native",
                "mkldnn": torch.backends.mkldnn.is_available(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
      "jax": {"version": jax.__version__, "backend": jax.default_backend(), "devices": len(jax.devices()),
              # XLA:CPU sizes its intra-op (Eigen) pool to the usable cores; it has no runtime knob.
              "intra_op_threads": "XLA default = usable cores", "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")},
  }


def uptime() -> str:
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def print_table(results, peak):
  hdr = (f"{'row':<11} {'shape':<28} {'torch tok/s':>12} {'ztt_jax tok/s':>14} {'ratio':>6} "
         f"{'MFU jax':>8} {'loss torch':>10} {'loss jax':>9} {'|dloss0|':>9}")
  print(hdr)
  print("-" * len(hdr))
  for res in results:
    s = res["shape"]
    shape = f"{s['layers']}L d{s['d']} h{s['heads']} F{s['mlp']} T{s['T']} B{s['B']}"
    if res["layout"] == "ztt":
      shape = f"ztt 1+2x3+1 d{s['d']} T{s['T']} B{s['B']}"
    tps = res["tokens_per_sec"]
    for k in [k for k in tps if k != "torch"]:
      mfu = res["model_flops_per_token"] * tps[k] / peak["total"]
      label = res["row"] if k == "ztt_jax" else res["row"] + " " + k.replace("ztt_jax_", "")
      print(f"{label:<11} {shape:<28} {tps['torch']:>12,.0f} {tps[k]:>14,.0f} {tps[k] / tps['torch']:>5.2f}x "
            f"{100 * mfu:>7.1f}% {res['final_loss']['torch']:>10.4f} {res['final_loss'][k]:>9.4f} "
            f"{abs(res['loss0'][k] - res['loss0']['torch']):>9.1e}")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rows", default="baby,d256,ztt", help=f"comma-separated, of {', '.join(ROWS)}")
  ap.add_argument("--data", default=None, help="a byte/text file to sample windows from (default: random tokens)")
  ap.add_argument("--rounds", type=int, default=7, help="timed windows per framework per row")
  ap.add_argument("--window_s", type=float, default=2.0, help="target seconds per window (all sides get the same steps)")
  ap.add_argument("--warmup_steps", type=int, default=3)
  ap.add_argument("--num_batches", type=int, default=32, help="distinct batches, cycled")
  ap.add_argument("--nominal_steps", type=int, default=2000, help="length of the LR schedule (warmup 10)")
  ap.add_argument("--remat", default=None, help="ztt_jax model.remat_policy (default: the config default)")
  ap.add_argument("--threads", default=None,
                  help="torch.set_num_threads: a number, or 'best' (time 1 and all cores per row, keep the "
                       "faster; for a shared machine). Default: the usable cores")
  ap.add_argument("--torch_fused", type=int, default=1, help="torch AdamW fused=True (its fastest CPU path)")
  ap.add_argument("--json", default=None, help="write the results here")
  ap.add_argument("--quick", action="store_true", help="2 rounds of short windows (a smoke run)")
  args = ap.parse_args(argv)
  if args.quick:
    args.rounds, args.window_s, args.warmup_steps, args.num_batches = 2, 0.2, 1, 4
  if args.remat is None:
    from ztt_jax.model.config import ModelConfig
    args.remat = ModelConfig().remat_policy
  threads = thread_report()
  torch.set_num_threads(threads["cores_usable"] if args.threads in (None, "best") else int(args.threads))
  threads = thread_report()
  load_before = uptime()
  load_1m = os.getloadavg()[0]
  if load_1m > 0.5 * threads["cores_usable"]:
    print(f"WARNING: load average {load_1m:.1f} on {threads['cores_usable']} cores: other work shares them. torch's "
          "OpenMP threads slow down many-fold when a core is taken (ztt_jax's thread pool much less), so the "
          "ratios below overstate ztt_jax. Run on an idle machine, or pass --threads=best.")
  print(f"torch {torch.__version__}: {threads['torch']['num_threads']} threads "
        f"({threads['torch']['parallel_backend']}), interop {threads['torch']['num_interop_threads']}, "
        f"AdamW fused={bool(args.torch_fused)} | jax {jax.__version__} {threads['jax']['backend']}: "
        f"{threads['jax']['intra_op_threads']} ({threads['cores_usable']}), "
        f"XLA_FLAGS={threads['jax']['XLA_FLAGS']!r} | {threads['cpu_model']}")
  print(f"before: {load_before}")
  peak = peak_flops_info(dtype="float32")
  results, batches_cache = [], {}
  for name in [r for r in args.rows.split(",") if r]:
    if name not in ROWS:
      raise SystemExit(f"--rows: unknown row {name!r}; use {', '.join(ROWS)}")
    runners, batches, info = build_row(name, args, batches_cache)
    res = {**info, **time_row(runners, batches, info, args)}
    results.append(res)
    tps = res["tokens_per_sec"]
    print(f"  {name}: " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in tps.items())
          + f" (torch {res['torch_threads']} threads; {res['window_steps']} steps/window, {args.rounds} rounds; params {res['params']:,}; "
          f"loss0 torch {res['loss0']['torch']:.6f} jax {res['loss0']['ztt_jax']:.6f})", flush=True)
  load_after = uptime()
  print()
  print_table(results, peak)
  print(f"\nafter: {load_after}")
  worst = max((r["model_flops_per_token"] * v / peak["total"] for r in results for k, v in r["tokens_per_sec"].items()),
              default=0.0)
  if worst > 1.0:
    print(f"WARNING: an MFU above 100% means the cached peak ({peak['total'] / 1e9:.1f} GFLOP/s) was measured on a "
          "busy machine; refresh it on an idle one: python -m ztt_jax.flops --remeasure")
  print(f"MFU against this host's cached float32 matmul peak {peak['total'] / 1e9:.1f} GFLOP/s ({peak['source']}); "
        f"ratio = ztt_jax / torch, median of alternating windows. Torch's ztt row includes the zero slot.")
  if args.json:
    out = {"argv": sys.argv[1:] if argv is None else list(argv), "threads": threads,
           "load_before": load_before, "load_after": load_after, "peak_flops": peak,
           "data": args.data or "random tokens", "rows": results}
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1, default=float)
    print(f"wrote {args.json}")
  return results


if __name__ == "__main__":
  main()

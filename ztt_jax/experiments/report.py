"""Saved JSON -> markdown tables and PNGs for results.md (reads files; trains and evaluates nothing).

The report's prose is written by hand; the tables sit between `<!-- auto:NAME -->` and
`<!-- /auto:NAME -->` markers and are regenerated in place, so every number in them comes from the
JSON under DOCS/results/. DOCS is OUT/report unless --docs names one (the repo's docs/ is published
that way); what it may replace there is ztt_jax/experiments/published.py's rule.
"""
from __future__ import annotations

import fnmatch
import json
import re
from typing import Optional

from ztt_jax import storage
from ztt_jax.data.config import SYNTHETIC_KINDS
from ztt_jax.experiments import figures, published, summary as summary_lib
from ztt_jax.experiments.ladder import BASE_RUNGS, RUNGS, TASKS, result_stem
from ztt_jax.plots import plot_quality_vs_compute


def _fmt(s: dict, digits=3, pct=False) -> str:
  if not s or s.get("mean") is None:
    return "n/a"
  k = 100.0 if pct else 1.0
  return f"{k * s['mean']:.{digits}f} ± {k * s['spread']:.{digits}f}"


def _rules(sw: dict) -> list[str]:
  """The sweep's rules in the order it ran them (fixed first, then each signal)."""
  return list(dict.fromkeys(p["rule"] for p in sw["points"]))


def _parameter(p: dict) -> str:
  return f"c={p['parameter']}" if p["rule"] == "fixed" else f"tau={p['parameter']:.4g}"


def ladder_table(s: dict) -> str:
  """One row per rung; on an embedded task accuracy overall and at each difficulty d."""
  embedded = s["task"] in SYNTHETIC_KINDS
  levels = sorted({d for r in s["rungs"].values() for d in r.get("accuracy_by_difficulty", {})}, key=int)
  steps = sorted({st for r in s["rungs"].values() for st in r.get("eval_loss_by_step", {})}, key=int)
  mid = [st for st in steps if int(st) < s["budget"]["steps"]]
  head = ["rung", "seeds", "unique params", "effective depth"] + [f"loss @ step {st}" for st in mid]
  head += ["final held-out loss (nats)"]
  head += ["accuracy %"] + [f"acc % @ d={d}" for d in levels] if embedded else \
      ["bits per byte", "nanoGPT-protocol loss (nats/byte)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in s["rungs"].items():
    row = [f"`{name}`", str(len(r["seeds"])), f"{r['params']:,}", str(r["effective_depth"])]
    row += [_fmt(r["eval_loss_by_step"].get(st)) for st in mid]
    row += [_fmt(r["eval_loss"])]
    if embedded:
      by = r.get("accuracy_by_difficulty", {})
      row += [_fmt(r.get("accuracy"), 1, pct=True)] + [_fmt(by.get(d), 1, pct=True) for d in levels]
    else:
      row += [_fmt(r["bits_per_byte"]), _fmt(r.get("nanogpt_eval_loss", {}))]
    lines.append("| " + " | ".join(row) + " |")
  b = s["budget"]
  lines.append("")
  lines.append(f"Budget {b['steps']} steps x {b['tokens_per_step']} tokens = {b['tokens_per_run']:,} "
               f"training tokens per run; {b['runs']} runs, {b['train_wall_s_total'] / 60:.1f} min of "
               "training wall time in total. Values are mean ± half the range over seeds (± 0 for one seed).")
  return "\n".join(lines)


def sweep_table(sw: dict) -> str:
  metric = sw["metric"]
  head = ["rule", "parameter", "mean cycles", "compute fraction", metric]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for rule in _rules(sw):
    for p in sorted((p for p in sw["points"] if p["rule"] == rule), key=lambda p: p["mean_cycles"]):
      val = f"{100 * p[metric]:.1f}%" if metric == "accuracy" else f"{p[metric]:.4f}"
      lines.append(f"| {rule} | {_parameter(p)} | {p['mean_cycles']:.2f} | {p['compute_fraction']:.3f} | {val} |")
  return "\n".join(lines)


def difficulty_table(sw: dict) -> str:
  """The exit bake-off by difficulty: mean cycles and accuracy at each difficulty d for every point
  of every rule the sweep ran, so a rule that tracks difficulty shows cycles rising with d."""
  pts = [p for rule in _rules(sw) for p in sorted(
      (p for p in sw["points"] if p["rule"] == rule and p.get("per_difficulty")), key=lambda p: p["mean_cycles"])]
  if not pts:
    return "(no per-difficulty data)"
  levels = sorted(pts[0]["per_difficulty"], key=int)
  head = ["rule", "parameter", "mean cycles (all)", "compute fraction", "accuracy (all)"]
  head += [f"cycles @ d={d}" for d in levels] + [f"acc @ d={d}" for d in levels]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for p in pts:
    by = p["per_difficulty"]
    row = [p["rule"], _parameter(p), f"{p['mean_cycles']:.2f}", f"{p['compute_fraction']:.3f}",
           f"{100 * p['accuracy']:.1f}%"]
    row += [f"{by[d]['mean_cycles']:.2f}" for d in levels]
    row += [f"{100 * by[d]['accuracy']:.1f}%" for d in levels]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def depth_table(d: dict) -> str:
  """Accuracy by difficulty at each test-time cycle count (exit off), from a depth_*.json."""
  levels = sorted(d["points"][0]["per_difficulty"], key=int)
  head = ["cycles", "all"] + [f"d={x}{' (untrained)' if int(x) > d['trained_max_difficulty'] else ''}"
                              for x in levels]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for p in d["points"]:
    mark = " (trained)" if p["num_cycles"] == d["trained_cycles"] else ""
    row = [f"{p['num_cycles']}{mark}", f"{100 * p['accuracy']:.1f}%"]
    row += [f"{100 * p['per_difficulty'][x]['accuracy']:.1f}%" for x in levels]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def bench_table(b: dict) -> str:
  targets = {"throughput": "≥ 0.95", "compile": "≤ 1.5", "exit": "—", "remat": "—", "mfu": "—"}
  what = {"throughput": "ztt / vanilla train tokens/s (equal effective depth 8 and width)",
          "compile": "compile time C=32 / C=2 (fwd+bwd)",
          "exit": "forward time all cycles / 1 of 8 cycles (skip path)",
          "remat": "train-step peak bytes / peak with no remat",
          "mfu": "train-step MFU vs measured f32 matmul peak"}
  lines = ["| suite | ratio | what | target | detail |", "|---|---|---|---|---|"]
  for name, r in b["suites"].items():
    if isinstance(r["ratio"], dict):
      ratio = ", ".join(f"{k}: {v:.2f}" for k, v in r["ratio"].items())
    else:
      ratio = f"{r['ratio']:.3f}"
    lines.append(f"| {name} | {ratio} | {what.get(name, '')} | {targets.get(name, '')} | {_bench_detail(name, r)} |")
  return "\n".join(lines)


def _bench_detail(name, r) -> str:
  if name == "throughput":
    z, v = r["ztt"], r["vanilla"]
    return (f"ztt {z['tokens_per_sec']:,.0f} tok/s, MFU {100 * z['mfu']:.1f}%; vanilla "
            f"{v['tokens_per_sec']:,.0f} tok/s, MFU {100 * v['mfu']:.1f}%; htc / vanilla "
            f"{r['htc_over_vanilla']:.3f} (d={r['shape']['d_model']}, "
            f"T={r['shape']['seq_len']}, B={r['shape']['batch']})")
  if name == "compile":
    return ", ".join(f"C={c}: {s:.2f} s" for c, s in r["seconds"].items())
  if name == "exit":
    # also against the all-cycles run of the same exit program (last row), which ran faster than the
    # no-exit baseline in our runs; the smaller of the two speedups is the conservative one
    last = r["forward"][-1]["ms"]
    s = ", ".join(f"{x['cycles_run']} of 8 cycles: {x['speedup']:.2f}x ({last / x['ms']:.2f}x vs 8 of 8)"
                  for x in r["forward"])
    d = r.get("decode")
    if isinstance(d, dict) and "unreliable" in d:
      s += f"; decode: {d['ratio']:.2f}x, unreliable: {d['unreliable']}"
    elif isinstance(d, dict) and "ratio" in d:
      s += (f"; decode: {d['ratio']:.2f}x at {d['mean_cycles']:.2f} of {d['cycles']} cycles "
            f"({d['tokens_per_sec_exit']:.0f} vs {d['tokens_per_sec_off']:.0f} tok/s, batch {d['batch']})")
    elif isinstance(d, dict):
      s += f"; decode: {d.get('skipped', 'not measured')}"
    else:
      s += "; decode: not measured"
    return s
  if name == "remat":
    return ", ".join(f"{p}: {v['peak_bytes'] / 2**20:.1f} MiB (temp {v['temp_size_in_bytes'] / 2**20:.1f})"
                     for p, v in r["policies"].items())
  if name == "mfu":
    sh = r["shape"]
    return (f"d={sh['d_model']}, depth {sh['effective_depth']}, T={sh['seq_len']}, B={sh['batch']}: "
            f"{r['tokens_per_sec']:,.0f} tok/s, {r['achieved_flops'] / 1e9:.2f} GFLOP/s of a measured "
            f"{r['peak_flops'] / 1e9:.1f} GFLOP/s peak")
  return ""


def fill(text: str, blocks: dict) -> str:
  """Replace the body of every `<!-- auto:NAME -->...<!-- /auto:NAME -->` block we have a value for."""
  for name, body in blocks.items():
    pat = re.compile(rf"(<!-- auto:{re.escape(name)} -->).*?(<!-- /auto:{re.escape(name)} -->)", re.S)
    text = pat.sub(lambda m: m.group(1) + "\n" + body + "\n" + m.group(2), text)
  return text


def load_sweeps(results_dir: str, task: str, kind: str = "sweep") -> list[dict]:
  names = storage.listdir(results_dir) if storage.isdir(results_dir) else []
  return [json.loads(storage.read_text(storage.join(results_dir, n)))
          for n in fnmatch.filter(names, f"{kind}_{task}_s*.json")]


def recipe_blocks(results: str, task: str) -> dict:
  """A recipe rung's own test-time depth and mean cycles by difficulty (seed 0), beside the ztt's."""
  blocks = {}
  for rung in RUNGS:
    if rung in BASE_RUNGS:
      continue
    stem = result_stem(task, rung)
    depths = load_sweeps(results, stem, kind="depth")
    if depths:
      blocks[f"depth_{stem}"] = depth_table(depths[0])
    sweeps = load_sweeps(results, stem)
    if sweeps and rung != "ztt+gate":  # the gate's bake-off has its own block
      blocks[f"cycles_by_difficulty_{stem}"] = difficulty_table(sweeps[0])
  return blocks


def plain_reference(s: dict) -> str:
  """What `make train` prints after the default run: the propagation ladder's vanilla-4 by difficulty."""
  r = s["rungs"]["vanilla-4"]
  n = r["accuracy"]["n"]
  lines = ["For comparison, configs/default.py:vanilla (4 unique layers, the same unique parameters, one pass),",
           f"from the ladder in docs/results.md ({n} seed{'s' if n > 1 else ''}, mean):",
           f"  accuracy (all difficulties): {r['accuracy']['mean']:.3f}"]
  for d, acc in sorted(r["accuracy_by_difficulty"].items(), key=lambda kv: int(kv[0])):
    lines.append(f"  difficulty={d}: accuracy {acc['mean']:.3f}, mean cycles 1.00")
  return "\n".join(lines) + "\n"


def _png(plot, data, *args, **kwargs):
  """A writer of `plot(data, path, ...)`'s PNG carrying the report's marker."""
  def write(path):
    plot(data, path, *args, **kwargs)
    published.stamp_png(path)
  return write


def _json(obj):
  def write(path):
    with open(path, "w") as f:
      json.dump(obj, f, indent=1)
  return write


def _text(text):
  def write(path):
    with open(path, "w") as f:
      f.write(text)
  return write


def _plan(out_dir: str, docs: str) -> tuple:
  """(blocks, {path: write(path)}, {task: ladder summary}): everything the report would write into
  `docs`, computed without writing anything."""
  results = storage.join(docs, "results")
  blocks, files = {}, {}
  ladders = summary_lib.summaries(out_dir)
  for task, s in ladders.items():
    blocks[f"ladder_{task}"] = ladder_table(s)
    files[storage.join(results, f"ladder_{task}.json")] = _json(s)
    files[storage.join(docs, f"ladder_{task}.png")] = _png(figures.plot_ladder, s)
    if task == "propagation" and "vanilla-4" in s["rungs"]:
      files[storage.join(results, "default_vanilla.txt")] = _text(plain_reference(s))
  for task in TASKS:
    embedded = task in SYNTHETIC_KINDS
    sweeps = load_sweeps(results, task)
    for i, sw in enumerate(sweeps):
      blocks[f"exit_{task}_s{i}"] = sweep_table(sw)
    if sweeps:
      files[storage.join(docs, f"exit_{task}.png")] = _png(
          plot_quality_vs_compute, sweeps[0], title=f"{task}: exit rules on the trained ztt (seed 0)", x="mean_cycles")
    if sweeps and embedded:
      blocks[f"cycles_by_difficulty_{task}"] = "\n\n".join(
          f"Seed {i}:\n\n" + difficulty_table(sw) for i, sw in enumerate(sweeps))
      files[storage.join(docs, f"cycles_by_difficulty_{task}.png")] = _png(
          figures.plot_cycles_by_difficulty, sweeps, task)
    gated = load_sweeps(results, result_stem(task, "ztt+gate"))
    if gated:  # the gate rung has every rule, the gate's too, on one model: the task's bake-off
      blocks[f"exit_{task}_gate"] = sweep_table(gated[0])
      files[storage.join(docs, f"exit_{task}_gate.png")] = _png(
          plot_quality_vs_compute, gated[0], title=f"{task}: every exit rule on the trained ztt+gate (seed 0)",
          x="mean_cycles")
      if embedded:
        blocks[f"cycles_by_difficulty_{task}_gate"] = difficulty_table(gated[0])
    depths = load_sweeps(results, task, kind="depth") if embedded else []
    if depths:
      blocks[f"depth_{task}"] = "\n\n".join(f"Seed {d['seed']}:\n\n" + depth_table(d) for d in depths)
      files[storage.join(docs, f"depth_{task}.png")] = _png(figures.plot_depth, depths[0], task)
    if embedded:
      blocks.update(recipe_blocks(results, task))
  bench = storage.join(results, "bench.json")
  if storage.isfile(bench):
    blocks["bench"] = bench_table(json.loads(storage.read_text(bench)))
  return blocks, files, ladders


def _block(text: str, name: str) -> Optional[str]:
  m = re.search(rf"<!-- auto:{re.escape(name)} -->(.*?)<!-- /auto:{re.escape(name)} -->", text, re.S)
  return m.group(1) if m else None


def _check(docs: str, files: dict, ladders: dict, *, overwrite: bool, default_dir: str) -> None:
  """Every rule of ztt_jax/experiments/published.py, before anything is written."""
  published.check_ours(files, docs)
  md = storage.join(docs, "results.md")
  text = storage.read_text(md) if storage.isfile(md) else ""
  for task, s in ladders.items():
    new = published.ladder_size(s)
    path = storage.join(docs, "results", f"ladder_{task}.json")
    old = published.load_json(path)
    old = published.ladder_size(old) if storage.isfile(path) and published.is_summary(old) else None
    published.check_not_smaller(path, old, new, overwrite=overwrite, default_dir=default_dir)
    block = _block(text, f"ladder_{task}")
    published.check_not_smaller(f"{md} (block ladder_{task})", published.block_size(block) if block else None, new,
                                overwrite=overwrite, default_dir=default_dir)


def build_blocks(out_dir: str, docs: str, *, overwrite: bool = False, default_dir: str = "OUT/report") -> dict:
  """The results.md blocks, after writing the summaries, PNGs and text they come with into `docs`
  once every file they replace has passed the checks (OutputError otherwise, nothing written)."""
  blocks, files, ladders = _plan(out_dir, docs)
  _check(docs, files, ladders, overwrite=overwrite, default_dir=default_dir)
  for path, write in files.items():
    storage.makedirs(storage.parent(path))
    published.write_atomic(path, write)
  return blocks


def write_all(out_dir: str, docs: Optional[str] = None, *, overwrite: bool = False) -> dict:
  """The report of the ladder under `out_dir`, into `docs` (default OUT/report): summaries, PNGs and
  the blocks of DOCS/results.md (created holding just the blocks if it does not exist)."""
  dest = published.report_dir(out_dir, docs)
  blocks = build_blocks(out_dir, dest, overwrite=overwrite, default_dir=published.report_dir(out_dir, None))
  md = storage.join(dest, "results.md")
  exists = storage.isfile(md)
  if exists:
    text = storage.read_text(md)
    missing = [k for k in blocks if f"<!-- auto:{k} -->" not in text]
    if missing:
      print(f"results.md has no block for: {', '.join(missing)}")
  else:
    text = "# Results\n\nWritten by ztt_jax.experiments.report; each table is regenerated in place.\n" + "".join(
        f"\n## {k}\n\n<!-- auto:{k} -->\n<!-- /auto:{k} -->\n" for k in blocks)
  new = fill(text, blocks)
  if not exists or new != text:
    published.write_atomic(md, _text(new))
  for k in blocks:
    print(f"updated block {k}")
  print(f"report written to {dest}")
  return blocks

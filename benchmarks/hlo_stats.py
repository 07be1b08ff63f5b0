"""Counts what an optimized XLA HLO module executes per call, loop trip counts included.

XLA's own `cost_analysis()` counts a while loop's body once, so for a model whose layers run in a
`scan` it undercounts FLOPs by the trip count. This reads `compiled.as_text()` (the module after
optimization) and weights every instruction by how many times its computation runs: a fusion's
body as often as the fusion, a while body `known_trip_count` times per loop, conditional branches
once each (an upper bound). It is deterministic: the same program gives the same counts on an idle
or a busy machine.

  stats = hlo_stats(compiled.as_text())
  stats['dot_flops'], stats['top_level_ops'], stats['copies'], stats['transposes'], ...
"""
from __future__ import annotations

import collections
import math
import re

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
                "s64": 8, "u64": 8, "s16": 2, "u16": 2}
# Instructions that launch no work of their own (XLA:CPU emits no thunk for them).
_FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
             "replica-id", "opt-barrier"}

_COMP_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_ARRAY_RE = re.compile(r"\b(pred|[a-z]+\d+)\[([\d,]*)\]")


def _split_shape_op(rest: str):
  """'f32[2,3]{1,0} dot(%a, %b), lhs_...' -> (shape text, opcode, remainder). Tuple shapes nest parens."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        shape, tail = rest[:i + 1], rest[i + 1:].lstrip()
        break
  else:
    shape, _, tail = rest.partition(" ")
  m = re.match(r"([\w\-]+)\((.*)", tail)
  if not m:
    return shape, tail.split("(")[0].strip(), ""
  return shape, m.group(1), m.group(2)


def _arrays(shape: str):
  return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY_RE.findall(shape)]


def _nbytes(shape: str) -> int:
  return sum(_DTYPE_BYTES.get(dt, 4) * math.prod(dims) for dt, dims in _arrays(shape))


def parse(text: str):
  """{computation: [instr dicts]}, entry name, {instr name: shape text}."""
  comps, shapes, entry, cur = {}, {}, None, None
  for line in text.splitlines():
    if cur is None:
      m = _COMP_RE.match(line.strip())
      if m and not line.startswith(" "):
        cur = m.group(2)
        comps[cur] = []
        if m.group(1):
          entry = cur
      continue
    if line.strip() == "}":
      cur = None
      continue
    m = _INSTR_RE.match(line)
    if not m:
      continue
    name, rest = m.group(2), m.group(3)
    shape, op, tail = _split_shape_op(rest)
    shapes[name] = shape
    comps[cur].append({"name": name, "shape": shape, "op": op, "tail": tail, "line": line})
  return comps, entry, shapes


def _called(instr):
  """(computation, multiplier, fused) pairs this instruction runs."""
  t = instr["tail"]
  out = []
  if instr["op"] == "fusion":
    m = re.search(r"calls=%([\w.\-]+)", t)
    if m:
      out.append((m.group(1), 1, True))
  elif instr["op"] == "while":
    body = re.search(r"body=%([\w.\-]+)", t)
    trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', t)
    if body:
      out.append((body.group(1), int(trip.group(1)) if trip else 1, False))
  elif instr["op"] == "conditional":
    m = re.search(r"branch_computations=\{([^}]*)\}", t)
    names = re.findall(r"%([\w.\-]+)", m.group(1)) if m else re.findall(r"(?:true|false)_computation=%([\w.\-]+)", t)
    out.extend((n, 1, False) for n in names)
  elif instr["op"] in ("call", "async-start"):
    m = re.search(r"(?:to_apply|calls)=%([\w.\-]+)", t)
    if m:
      out.append((m.group(1), 1, False))
  return out


def hlo_stats(text: str) -> dict:
  comps, entry, shapes = parse(text)
  mult = collections.Counter()   # executions per call of the module
  fused = set()                  # computations that are fusion bodies (one kernel, no thunks inside)
  order = [entry]
  mult[entry] = 1
  i = 0
  while i < len(order):  # callers come before callees in a breadth-first walk from ENTRY
    c = order[i]
    i += 1
    for ins in comps.get(c, []):
      for callee, k, is_fused in _called(ins):
        if callee not in mult:
          order.append(callee)
        mult[callee] += mult[c] * k
        if is_fused or c in fused:
          fused.add(callee)

  stats = collections.Counter()
  by_op = collections.Counter()
  copy_sources = collections.Counter()
  for c in order:
    m = mult[c]
    for ins in comps.get(c, []):
      op = ins["op"]
      inside = c in fused
      if op == "dot":
        operands = re.findall(r"%([\w.\-]+)", ins["tail"].split(")")[0])
        lhs = _arrays(shapes.get(operands[0], "")) if operands else []
        cdims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins["tail"])
        k = 1
        if lhs and cdims and cdims.group(1):
          k = math.prod(lhs[0][1][int(d)] for d in cdims.group(1).split(","))
        out = _arrays(ins["shape"])
        stats["dot_flops"] += m * 2 * (math.prod(out[0][1]) if out else 0) * k
        stats["dots"] += m
      if op in ("copy", "transpose"):
        kind = "copies" if op == "copy" else "transposes"
        where = "in_fusion" if inside else "top_level"
        stats[f"{kind}_{where}"] += m
        stats[f"{kind}_{where}_bytes"] += m * _nbytes(ins["shape"])
        meta = re.search(r'op_name="([^"]*)"', ins["line"])
        src = _short(meta.group(1)) if meta else _operand_hint(ins["tail"])
        copy_sources[(where, op, src, ins["shape"].split("{")[0])] += m * _nbytes(ins["shape"])
      if not inside and op not in _FREE_OPS:
        stats["top_level_ops"] += m
        by_op[op] += m
      if not inside and op == "while":
        stats["while_loops"] += m
      if op == "fusion" and not inside:
        kind = re.search(r"kind=(\w+)", ins["tail"])
        by_op[f"fusion:{kind.group(1) if kind else '?'}"] += m
  return {**stats, "top_level_by_op": dict(by_op.most_common()),
          "copy_transpose_sources": [
              {"where": where, "op": op, "source": src, "shape": shp, "bytes_per_step": n}
              for (where, op, src, shp), n in copy_sources.most_common(25)]}


def _operand_hint(tail: str) -> str:
  """No metadata (XLA-inserted copies): name the operand, e.g. an optimizer-state parameter."""
  m = re.match(r"%([\w.\-]+)", tail)
  return "operand " + re.sub(r"(\.\d+)+$", "", m.group(1))[:60] if m else "?"


def _short(op_name: str) -> str:
  """The model-level part of a JAX op name (drop jit(...)/while/body/closed_call noise)."""
  parts = [p for p in op_name.split("/") if p and p not in ("while", "body", "closed_call", "cond")
           and not p.startswith("jit(")]
  return "/".join(parts[-4:])

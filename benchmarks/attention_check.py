"""The device check of the zero-slot attention implementations (ztt_jax/model/attention_impls/):
max |impl - reference| of out, a0 and every gradient, on the device this runs on. benchmarks/gpu.sh
runs it through gpu_bench.py's numerics step; by hand:

  python benchmarks/attention_check.py [IMPL ...]     # default: auto chunked; prints one JSON line each

Kept out of the package: it compiles six programs on random inputs and is a benchmark of the
kernels on real hardware, not something a training run needs.
"""
from __future__ import annotations

import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ztt_jax.model.attention_impls import attention, resolve  # noqa: E402


def check_against_reference(impl: str, *, batch: int = 2, seq_len: int = 1024, num_heads: int = 4,
                            head_dim: int = 64, dtype: str = "bfloat16", zero_bias: bool = True,
                            block_size: int = 0, seed: int = 0) -> dict:
  """Max |impl - reference| of out, a0 and the gradients (q, k, v, zero key, zero bias) on random
  inputs, on the default backend; the reference runs in float32 on the same (rounded) inputs.

  Also returns the resolved implementation and the errors of `chunked` in the same dtype, as a
  yardstick for what the dtype's rounding costs.
  """
  dt = jnp.dtype(dtype)
  B, T, H, K = batch, seq_len, num_heads, head_dim
  r = jax.random.split(jax.random.key(seed), 6)
  q, k, v = (jax.random.normal(r[i], (B, T, H, K), jnp.float32).astype(dt) for i in range(3))
  zk = (2.0 * jax.random.normal(r[3], (H, K), jnp.float32)).astype(dt)
  zb = jax.random.normal(r[4], (H,), jnp.float32) if zero_bias else None
  w_out = jax.random.normal(r[5], (B, T, H, K), jnp.float32)

  def loss(fn, q, k, v, zk, zb):
    out, a0 = fn(q, k, v, zk, zb)
    return jnp.sum(out.astype(jnp.float32) * w_out) + 3.0 * jnp.sum(a0 * jnp.arange(T) / T)

  def run(name, cast):
    fn = lambda q, k, v, zk, zb: attention(name, *(x.astype(cast) for x in (q, k, v, zk)), zb,
                                           block_size=block_size)
    f = jax.jit(lambda *a: (fn(*a), jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3, 4))(*a)))
    (out, a0), grads = f(q, k, v, zk, zb if zb is not None else jnp.zeros((H,)))
    return out.astype(jnp.float32), a0, [g.astype(jnp.float32) for g in grads]

  ref = run("reference", jnp.float32)

  def errors(got):
    names = ("dq", "dk", "dv", "dzero_key", "dzero_bias")
    e = {"out": float(jnp.max(jnp.abs(got[0] - ref[0]))), "a0": float(jnp.max(jnp.abs(got[1] - ref[1])))}
    e.update({n: float(jnp.max(jnp.abs(g - gr))) for n, g, gr in zip(names, got[2], ref[2])})
    return e

  resolved = resolve(impl, seq_len=T, dtype=dt, head_dim=K)
  return {"impl": impl, "resolved": resolved, "backend": jax.default_backend(), "dtype": dt.name,
          "shape": [B, T, H, K], "errors": errors(run(impl, dt)), "chunked_errors": errors(run("chunked", dt))}


if __name__ == "__main__":
  for impl in sys.argv[1:] or ["auto", "chunked"]:
    print(json.dumps(check_against_reference(impl)), flush=True)

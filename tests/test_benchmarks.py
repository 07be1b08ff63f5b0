"""The benchmark scripts run end to end on CPU (tiny shapes) and compare like with like."""
import json
import pathlib
import sys

import jax
import numpy as np
import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


@pytest.fixture
def cached_peak(tmp_path, monkeypatch):
  """A peak-FLOPs cache that already holds this host's entries, so nothing is timed."""
  from ztt_jax import flops
  path = tmp_path / "peak.json"
  dev = jax.local_devices()[0]
  path.write_text(json.dumps({flops.peak_cache_key(dev, dt): {"flops": 1e11, "per_size": {}}
                              for dt in ("float32", "bfloat16")}))
  monkeypatch.setenv(flops.PEAK_CACHE_ENV, str(path))
  return path


@pytest.mark.parametrize("layout", ["vanilla", "ztt"])
def test_torch_model_computes_the_same_function(layout):
  """vs_torch's PyTorch decoder, loaded with ztt_jax's params, gives ztt_jax's logits: the two
  sides of the benchmark are the same model (GPT-2 form, zero slot included for ztt)."""
  torch = pytest.importorskip("torch")
  import flax.linen as nn
  import vs_torch
  from ztt_jax.model import ModelConfig, ZTTModel
  from ztt_jax.model.lm import count_params

  kw = dict(variant="vanilla", d_model=32, num_heads=2, mlp_dim=64, vocab_size=vs_torch.VOCAB, max_seq_len=16,
            n_head_layers=0, n_middle_layers=2, n_tail_layers=0, num_cycles=1, **vs_torch.GPT2_FORM)
  if layout == "ztt":
    kw.update(variant="ztt", zero_key_init_std=1.0, **vs_torch.ZTT_LAYOUT)  # a visible zero slot
  cfg = ModelConfig(**kw)
  model = ZTTModel(cfg)
  toks = np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int32)
  params = jax.device_get(jax.jit(lambda k: nn.unbox(model.init(k, toks)["params"]))(jax.random.key(0)))
  logits_jax = np.asarray(jax.jit(lambda p: model.apply({"params": p}, toks)[0])(params))

  tm = vs_torch.TorchLM(vocab=cfg.vocab_size, max_len=cfg.max_seq_len, d=cfg.d_model, heads=cfg.num_heads,
                        mlp=cfg.mlp_dim, n_head=cfg.unique_head_layers, n_middle=cfg.stack_layers,
                        n_tail=cfg.unique_tail_layers, cycles=cfg.cycles, zero_token=cfg.use_zero_token)
  vs_torch.load_ztt_params(tm, params)
  assert sum(p.numel() for p in tm.parameters()) == count_params(params)
  with torch.no_grad():
    logits_torch = tm(torch.from_numpy(toks).long()).numpy()
  np.testing.assert_allclose(logits_torch, logits_jax, atol=2e-5, rtol=1e-5)


def test_hlo_stats_counts_loop_trips():
  """A scan of 5 matmuls counts 5 matmuls' FLOPs (XLA's cost analysis counts the body once)."""
  import jax.numpy as jnp
  from hlo_stats import hlo_stats

  def f(x, ws):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

  x, ws = jnp.ones((8, 32)), jnp.ones((5, 32, 32))
  text = jax.jit(f).lower(x, ws).compile().as_text()
  st = hlo_stats(text)
  assert st["dot_flops"] == 5 * 2 * 8 * 32 * 32
  assert st["top_level_ops"] > 0


def test_gpu_bench_tiny_runs_end_to_end(tmp_path, cached_peak, monkeypatch):
  """benchmarks/gpu_bench.py --tiny: numerics, one train configuration, decoding with exit off and
  on, one JSON. The same code paths as the GPU run, at a size CPU compiles in seconds.

  The numerics check itself (benchmarks/attention_check.py, tested with the attention
  implementations) is stubbed: it compiles six programs, and here only the driver's use of it is
  under test."""
  import gpu_bench
  import attention_check
  calls = []

  def fake_check(impl, **kw):
    calls.append((impl, kw["seq_len"], kw["dtype"]))
    return {"impl": impl, "resolved": "reference" if impl == "auto" else impl, "dtype": kw["dtype"],
            "errors": {"out": 0.0, "a0": 0.0}, "chunked_errors": {"out": 0.0, "a0": 0.0}}

  monkeypatch.setattr(attention_check, "check_against_reference", fake_check)
  out = tmp_path / "gpu.json"
  res = gpu_bench.main(["--tiny", "--seqs=32", "--cycles=2", "--steps=1", f"--json={out}"])
  saved = json.loads(out.read_text())
  assert saved["device"]["platform"] == jax.devices()[0].platform
  (row,) = saved["train"]
  assert "error" not in row, row.get("traceback")
  assert row["tokens_per_sec"] > 0 and 0 < row["mfu"] and row["cycles"] == 2 and row["seq_len"] == 32
  assert np.isfinite(row["loss"])
  for name in ("exit_off", "exit_on_tau0"):
    assert saved["decode"][name]["tokens_per_sec"] > 0, saved["decode"][name]
  assert saved["decode"]["exit_on_tau0"]["mean_cycles"] == 1.0  # threshold 0: every token exits after 1
  assert saved["decode"]["exit_off"]["mean_cycles"] == 2.0
  assert [c[0] for c in calls] == ["auto", "chunked"] and all(c[2] == "bfloat16" for c in calls)
  assert saved["numerics"]["chunked"]["errors"]["a0"] == 0.0
  assert res["seconds"] > 0


def test_gpu_bench_skips_what_does_not_fit(tmp_path, cached_peak):
  """With no budget left every item is recorded as skipped instead of overrunning the 8 minutes."""
  import gpu_bench
  res = gpu_bench.main(["--tiny", "--seqs=32", "--cycles=1", "--budget_s=0"])
  assert all("skipped" in r for r in res["train"])
  assert "skipped" in res["decode"]
  assert all("skipped" in r for r in res["numerics"].values())

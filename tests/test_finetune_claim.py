"""The fine-tuning claim's configs, budget guard and report, on fabricated results (no training)."""
import dataclasses
import json
import os

import numpy as np
import pytest

from ztt_jax.errors import ConfigError, OutputError
from ztt_jax.experiments import claim_report, finetune_claim as fc, published

DATA = os.path.join(os.path.dirname(__file__), "..", "README.md")  # any existing text file


def test_configs_are_the_text_ladder_in_llama_form():
  plan = fc.Plan(data=DATA, out="unused")
  t = fc.teacher_config(plan)
  m = t.model
  assert (m.canonical_variant, m.n_head_layers + m.n_middle_layers + m.n_tail_layers, m.num_kv_heads,
          m.tie_embeddings) == ("vanilla", 8, 2, False)
  assert (m.norm, m.position, m.mlp, m.use_bias) == ("rmsnorm", "rope", "swiglu", False)
  assert (m.d_model, m.num_heads, m.mlp_dim, t.data.seq_len, t.train.global_batch_size) == (128, 4, 512, 64, 12)
  assert (t.train.steps, t.train.learning_rate, t.data.seed, t.train.seed) == (4000, 3e-3, 0, 0)
  for rung in fc.CONTROLS:
    c = fc.control_config(plan, rung, 2)
    assert (c.train.steps, c.train.seed, c.model.num_kv_heads, c.model.tie_embeddings) == (5000, 2, 2, False)
  assert fc.control_config(plan, "ztt+inject", 0).model.input_injection == "embed"
  # equal total tokens: a control trains as long as the teacher plus one fine-tune
  assert plan.control_steps == plan.teacher_steps + plan.finetune_steps
  layer = dataclasses.replace(t, model=t.model.replace(norm="layernorm"))
  with pytest.raises(ConfigError, match="not Llama form"):
    fc.llama_form(layer)
  with pytest.raises(ConfigError, match="unknown stage"):
    fc.check_plan(plan, ["teacher", "warmup"])


def test_param_counts_and_budget_guard(tmp_path):
  tree = {"embed": {"embedding": np.zeros((5, 3))}, "final_norm": {"scale": np.zeros(3)},
          "middle": {"layers": {"attn": {"q_kernel": np.zeros((2, 3, 4)), "q_lora_a": np.zeros((3, 2, 3, 1))}}}}
  assert fc.param_counts(tree) == {"total": 15 + 3 + 24 + 18, "layers": 42, "lora": 18}
  run = tmp_path / "teacher"
  run.mkdir()
  (run / "result.json").write_text(json.dumps({"steps": 20}))
  assert fc._done(str(run), 20, "--teacher_steps")
  with pytest.raises(ConfigError, match="finished at 20 steps, not --teacher_steps=4000"):
    fc._done(str(run), 4000, "--teacher_steps")


def _write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def _result(stage, name, seed, loss, steps, layers, **kw):
  hw = {"platform": "Linux-x", "cpu": "cpu", "cores": 2, "usable_cores": 2, "jax": "0", "jax_backend": "cpu"}
  return {"stage": stage, name[0]: name[1], "seed": seed, "steps": steps, "tokens_per_step": 768, "wall_s": 10.0,
          "nanogpt_eval_loss": loss, "param_counts": {"total": layers + 100, "layers": layers, "lora": 0},
          "load_avg_start": [1.0, 1.0, 1.0], "load_avg_end": [2.0, 2.0, 2.0], "hardware": hw, **kw}


def fabricate(out, teacher_steps=40):
  _write(f"{out}/teacher/result.json", _result("teacher", ("rung", "vanilla-8"), 0, 1.50, teacher_steps, 800))
  _write(f"{out}/roundtrip.json", {"max_abs_logit_diff": 3e-6, "max_abs_logit": 9.0, "tolerance": 1e-4,
                                   "windows": 48, "transformers": "5"})
  after = {"copy": (1.60, 1.64), "average": (1.55, 1.57), "average+lora8": (1.51, 1.54), "average+lora32": (1.50, 1.52)}
  for arm, losses in after.items():
    layers = {"average+lora8": 440, "average+lora32": 720}.get(arm, 400)
    _write(f"{out}/convert/{arm}.json",
           {"nanogpt_eval_loss": 3.0, "param_counts": {"total": 0, "layers": layers, "lora": 0}})
    for seed, loss in enumerate(losses):
      _write(f"{out}/finetune/{arm}_s{seed}/result.json",
             _result("finetune", ("arm", arm), seed, loss, 10, layers, data_seed=1 + seed, learning_rate=1e-3,
                     cycle_loss_weight=0.5))
  for rung, loss in (("vanilla-4", 1.62), ("ztt", 1.63), ("ztt+inject", 1.58)):
    for seed in range(2):
      _write(f"{out}/controls/{rung}_s{seed}/result.json", _result("controls", ("rung", rung), seed, loss, 50, 400))
  points = [{"rule": "fixed", "parameter": c, "mean_cycles": c, "compute_fraction": c / 3, "loss": 2 - c / 10}
            for c in (1, 2, 3)]
  _write(f"{out}/exits/sweep_average+lora32_s0.json", {"seed": 0, "metric": "loss", "points": points, "step": 10})


def test_report_on_fabricated_results(tmp_path):
  out = str(tmp_path / "out")
  fabricate(out)
  s = claim_report.write_report(out, log=lambda _: None)
  g = s["goal"]
  # the claim's arm keeps at most HALF of the teacher's layer params; the best of all is named beside it
  assert (g["best_arm"], g["claim_arm"], g["best_control"]) == ("average+lora32", "average+lora8", "ztt+inject")
  assert g["gap_to_teacher"] == pytest.approx(0.025) and g["within_goal"] and g["beats_every_control"]
  assert g["layer_fraction"] == pytest.approx(440 / 800)
  assert s["arms"]["copy"]["after"]["spread"] == pytest.approx(0.02)
  md = open(f"{out}/finetune_claim.md").read()
  assert md.startswith(claim_report.MD_HEAD)
  assert "`average+lora8` 1.525 vs 1.500, +0.025 nats, 55% of the teacher's layer parameters: **met**" in md
  assert "best control `ztt+inject` 1.580: **met**" in md
  assert "The best arm of all is `average+lora32` (1.510, +0.010 nats, 90% of" in md
  assert "| fixed | c=2 | 2.00 | 0.667 | 1.8000 |" in md  # the exit bake-off block
  assert "| controls/ztt_s1 | 50 | 10 | 200 | 1.0/1.0/1.0 | 2.0/2.0/2.0 |" in md
  for png in ("finetune_claim.png", "exit_finetune_claim.png"):
    assert published.png_text(f"{out}/{png}")["written_by"] == published.MARKER
  claim_report.write_report(out, log=lambda _: None)  # its own files: replaced
  # never over a file it did not write
  with open(f"{out}/finetune_claim.md", "w") as f:
    f.write("my notes\n")
  with pytest.raises(OutputError, match="not written by the report"):
    claim_report.write_report(out, log=lambda _: None)
  os.remove(f"{out}/finetune_claim.md")
  # --docs: the blocks of results.md only, and never a bigger run replaced by a smaller one
  docs = tmp_path / "docs"
  docs.mkdir()
  (docs / "results.md").write_text(
      "# R\nprose\n<!-- auto:finetune_claim -->\nold\n<!-- /auto:finetune_claim -->\ntail\n")
  claim_report.write_report(out, str(docs), log=lambda _: None)
  text = (docs / "results.md").read_text()
  assert text.startswith("# R\nprose\n") and text.endswith("tail\n") and "old" not in text and "**met**" in text
  assert json.loads((docs / "results" / "finetune_claim.json").read_text())["written_by"] == published.MARKER
  small = str(tmp_path / "small")
  fabricate(small, teacher_steps=20)
  with pytest.raises(OutputError, match="refusing to replace it with a smaller one"):
    claim_report.write_report(small, str(docs), log=lambda _: None)
  claim_report.write_report(small, str(docs), overwrite=True, log=lambda _: None)

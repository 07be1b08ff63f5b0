"""The ablation ladder's configs and its report generator, on fabricated results (no training)."""
import json
import math
import os

import pytest

from ztt_jax.experiments import ladder, report, summary


def test_ladder_layouts():
  depth = {r: ladder.rung_config("multihop", r, 0).model.effective_depth for r in ladder.RUNGS}
  assert depth == {"vanilla-4": 4, "bc": 8, "htc": 8, "ztt": 8, "vanilla-8": 8}
  cfg = ladder.rung_config("text", "ztt", 1, data_path="/x.txt", steps=7)
  assert (cfg.train.seed, cfg.train.steps, cfg.data.seed, cfg.model.exit_threshold) == (1, 7, 0, None)
  with pytest.raises(ValueError, match="needs --data"):
    ladder.rung_config("text", "bc", 0)


def _fake_run(root, task, rung, seed, loss, acc=None):
  d = os.path.join(root, task, ladder.run_name(rung, seed))
  os.makedirs(d)
  final = {"eval/loss": loss, "eval/mean_cycles": 3.0}
  if acc is not None:
    final.update({"eval/accuracy": acc, "eval/accuracy_hops_1": acc + 0.1, "eval/accuracy_hops_2": acc - 0.1})
  with open(os.path.join(d, "result.json"), "w") as f:
    json.dump({"task": task, "rung": rung, "seed": seed, "steps": 10, "tokens_per_step": 64, "params": 1234,
               "effective_depth": 8, "variant": rung, "num_cycles": 3, "wall_s": 6.0,
               "median_tokens_per_sec": 100.0, "final": final}, f)


def test_report_tables_from_fabricated_json(tmp_path):
  out, docs = str(tmp_path / "runs"), str(tmp_path / "docs")
  for seed, (l, a) in enumerate([(1.0, 0.5), (2.0, 0.7)]):
    _fake_run(out, "multihop", "ztt", seed, l, a)
    _fake_run(out, "multihop", "vanilla-4", seed, l + 1, a - 0.2)
    _fake_run(out, "text", "htc", seed, l, None)
  os.makedirs(os.path.join(docs, "results"))
  with open(os.path.join(docs, "results.md"), "w") as f:
    f.write("intro\n<!-- auto:ladder_multihop -->\nold\n<!-- /auto:ladder_multihop -->\nkept\n")

  blocks = report.write_all(out, docs)

  s = json.load(open(os.path.join(docs, "results", "ladder_multihop.json")))
  assert list(s["rungs"]) == ["vanilla-4", "ztt"]  # ladder order, not file order
  z = s["rungs"]["ztt"]
  assert z["eval_loss"]["mean"] == pytest.approx(1.5) and z["eval_loss"]["spread"] == pytest.approx(0.5)
  assert z["accuracy_by_hop"]["2"]["mean"] == pytest.approx(0.5)
  rows = [l for l in blocks["ladder_multihop"].splitlines() if l.startswith("| `")]
  assert [r.split("|")[1].strip() for r in rows] == ["`vanilla-4`", "`ztt`"]
  assert "60.0 ± 10.0" in rows[1]  # accuracy %, mean ± half-range
  text_rows = blocks["ladder_text"].splitlines()
  assert any(f"{1.5 / math.log(2):.3f}" in r for r in text_rows)  # bits per byte
  md = open(os.path.join(docs, "results.md")).read()
  assert md.startswith("intro\n") and md.endswith("kept\n") and "old" not in md and "`ztt`" in md
  assert os.path.isfile(os.path.join(docs, "ladder_multihop.png"))


def test_stats_two_seeds():
  assert summary.stats([1.0, 3.0]) == {"mean": 2.0, "spread": 1.0, "n": 2, "values": [1.0, 3.0]}
  assert summary.stats([None])["mean"] is None

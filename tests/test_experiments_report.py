"""The ablation ladder's configs and its report generator, on fabricated results (no training)."""
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

import numpy as np

from ztt_jax.data.pipeline import open_source
from ztt_jax.errors import OutputError
from ztt_jax.experiments import ladder, published, report, runs, summary

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ladder_layouts():
  for task, cycled in (("multihop", 10), ("propagation", 10)):
    depth = {r: ladder.rung_config(task, r, 0).model.effective_depth for r in ladder.RUNGS}
    assert depth == {"vanilla-4": 4, "bc": 8, "htc": cycled, "ztt": cycled, "vanilla-8": 8, "ztt+inject": cycled,
                     "ztt+gate": cycled, "ztt+random": cycled, "ztt+truncated": cycled,
                     "ztt+a0target": cycled, "ztt+direct": cycled, "ztt+every2": cycled}, task
  rand = ladder.rung_config("propagation", "ztt+random", 2)
  assert (rand.train.cycles_mean, rand.train.cycles_max, rand.data.seed) == (4.0, 6, 2)
  cfg = ladder.rung_config("text", "ztt", 1, data_path="/x.txt", steps=7)
  assert (cfg.train.seed, cfg.train.steps, cfg.data.seed, cfg.model.exit_threshold) == (1, 7, 0, None)
  # nanoGPT's baby budget on text; configs/default.py's task (and the curriculum's shape) on multi-hop
  text = ladder.rung_config("text", "ztt+random", 0, data_path="/x.txt")
  assert (text.train.steps, text.train.global_batch_size, text.data.seq_len, text.model.d_model) == (2000, 12, 64, 128)
  assert (text.train.cycles_distribution, text.train.cycles_max) == ("poisson", 5)
  mh = ladder.rung_config("multihop", "ztt+inject", 0, steps=300)
  assert (mh.data.max_hops, mh.data.num_queries, mh.data.num_distractors, mh.model.input_injection) == (6, 3, 2, "embed")
  assert mh.data.curriculum_examples == 300 * 16
  # every propagation rung, vanilla included, attends through the task's window
  pr = ladder.rung_config("propagation", "vanilla-4", 0)
  assert (pr.data.kind, pr.data.window, pr.model.attention_window, pr.model.token_shift) == ("propagation", 4, 4, True)
  with pytest.raises(ValueError, match="needs --data"):
    ladder.rung_config("text", "bc", 0)


@pytest.mark.parametrize("task, config", [("multihop", "multihop"), ("propagation", "default")])
def test_embedded_ladders_are_their_configs_without_reading_them(task, config):
  """The package builds the embedded tasks' rungs itself (configs/ is not installed with it); the
  ztt rung at the default budget has configs/<config>.py's data, width, model extras and schedule."""
  from test_config import load_config
  from ztt_jax.config import parse
  want = parse(load_config(config))
  got = ladder.rung_config(task, "ztt", 0)
  assert got.data == want.data
  for section, fields in (("model", ("d_model", "num_heads", "mlp_dim", "token_shift", "attention_window",
                                     "cycle_loss_weight", "n_head_layers", "n_tail_layers", "num_cycles",
                                     "n_middle_layers", "max_seq_len", "cycle_readout")),
                          ("train", ("steps", "global_batch_size", "learning_rate", "warmup_steps")),
                          ("eval", ("batch_size", "max_batches"))):
    assert {k: getattr(getattr(got, section), k) for k in fields} == \
        {k: getattr(getattr(want, section), k) for k in fields}, section


def _fake_run(root, task, rung, seed, loss, acc=None, steps=10):
  d = os.path.join(root, task, ladder.run_name(rung, seed))
  os.makedirs(d)
  final = {"eval/loss": loss, "eval/mean_cycles": 3.0}
  if acc is not None:
    final.update({"eval/accuracy": acc, "eval/accuracy_difficulty_1": acc + 0.1, "eval/accuracy_difficulty_2": acc - 0.1})
  with open(os.path.join(d, "result.json"), "w") as f:
    json.dump({"task": task, "rung": rung, "seed": seed, "steps": steps, "tokens_per_step": 64, "params": 1234,
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
  assert z["accuracy_by_difficulty"]["2"]["mean"] == pytest.approx(0.5)
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


def test_nanogpt_batches_are_seeded_windows_of_the_held_out_tail(tmp_path):
  corpus = tmp_path / "c.txt"
  corpus.write_bytes(bytes(range(32, 127)) * 30)
  cfg = ladder.rung_config("text", "ztt", 0, data_path=str(corpus))
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_dir=str(tmp_path / "cache")))
  batches = runs.nanogpt_batches(cfg, num_batches=3, batch_size=4, seed=7)
  tokens = np.asarray(open_source(cfg.data).tokens)
  n_train = len(tokens) - int(round(0.1 * len(tokens)))
  starts = np.random.default_rng(7).integers(n_train, len(tokens) - 64, (3, 4))
  for b, row_starts in zip(batches, starts):
    assert b["inputs"].shape == (4, 64) and b["weights"].min() == 1.0
    for inp, tgt, s in zip(b["inputs"], b["targets"], row_starts):
      np.testing.assert_array_equal(inp, tokens[s:s + 64])
      np.testing.assert_array_equal(tgt, tokens[s + 1:s + 65])
  again = runs.nanogpt_batches(cfg, num_batches=3, batch_size=4, seed=7)
  assert all((a["inputs"] == b["inputs"]).all() for a, b in zip(batches, again))


def test_depth_table_marks_trained_cycles_and_untrained_difficulties():
  point = lambda c, accs: {"num_cycles": c, "accuracy": sum(accs) / len(accs),
                           "per_difficulty": {str(h + 1): {"accuracy": a} for h, a in enumerate(accs)}}
  d = {"trained_cycles": 2, "trained_max_difficulty": 1, "points": [point(2, [1.0, 0.5]), point(3, [1.0, 0.25])]}
  rows = report.depth_table(d).splitlines()
  assert rows[0] == "| cycles | all | d=1 | d=2 (untrained) |"
  assert rows[2] == "| 2 (trained) | 75.0% | 100.0% | 50.0% |" and rows[3] == "| 3 | 62.5% | 100.0% | 25.0% |"


def test_a_recipe_rungs_sweep_has_its_own_file_and_block(tmp_path):
  from ztt_jax.experiments import exits
  results = str(tmp_path / "docs" / "results")
  plain, gated = exits.sweep_path(results, "text", 0), exits.sweep_path(results, "text", 0, "ztt+gate")
  assert plain.endswith("sweep_text_s0.json") and plain != gated
  os.makedirs(results)

  def sweep(rules, loss):
    pts = [{"rule": r, "parameter": 0.5, "mean_cycles": 2.0, "compute_fraction": 0.75, "loss": loss} for r in rules]
    return {"metric": "loss", "points": pts}
  for path, sw in [(plain, sweep(["fixed", "zero_attention"], 1.25)),
                   (gated, sweep(["fixed", "zero_attention", "gate"], 1.5))]:
    with open(path, "w") as f:
      json.dump(sw, f)

  blocks = report.build_blocks(str(tmp_path / "runs"), str(tmp_path / "docs"))
  assert "1.2500" in blocks["exit_text_s0"] and "gate" not in blocks["exit_text_s0"]
  assert "| gate |" in blocks["exit_text_gate"] and "1.5000" in blocks["exit_text_gate"]
  assert "exit_text_s1" not in blocks  # the gate's sweep is not taken for a second ztt seed
  assert os.path.isfile(str(tmp_path / "docs" / "exit_text_gate.png"))


def test_propagation_report_from_fabricated_json(tmp_path):
  """The propagation task's blocks: accuracy by difficulty per rung, the exit bake-off with mean
  cycles by difficulty for every rule the sweep ran, and the depth-extrapolation table and plot."""
  from ztt_jax.experiments import exits
  out, docs = str(tmp_path / "runs"), str(tmp_path / "docs")
  results = os.path.join(docs, "results")
  os.makedirs(results)
  for seed, acc in enumerate([0.9, 0.7]):
    _fake_run(out, "propagation", "ztt", seed, 0.5, acc)
    _fake_run(out, "propagation", "vanilla-4", seed, 1.5, acc - 0.4)

  def by(cycles, accs):
    return {str(d + 1): {"mean_cycles": c, "accuracy": a} for d, (c, a) in enumerate(zip(cycles, accs))}
  point = lambda rule, par, cycles, accs: {
      "rule": rule, "parameter": par, "mean_cycles": sum(cycles) / len(cycles), "compute_fraction": 0.5,
      "accuracy": sum(accs) / len(accs), "per_difficulty": by(cycles, accs)}
  sweep = {"metric": "accuracy", "points": [
      point("fixed", 3, [3.0, 3.0], [1.0, 0.75]),
      point("zero_attention", 0.5, [2.5, 1.25], [1.0, 0.5]),
      point("state_delta", 0.01, [1.5, 2.75], [1.0, 0.75])]}  # a rule the report has never heard of
  with open(exits.sweep_path(results, "propagation", 0), "w") as f:
    json.dump(sweep, f)
  depth = {"task": "propagation", "seed": 0, "rung": "ztt", "trained_cycles": 3, "trained_max_difficulty": 2,
           "max_difficulty": 4, "points": [
               {"num_cycles": c, "accuracy": sum(a) / 4, "per_difficulty": by([c] * 4, a)}
               for c, a in [(3, [1.0, 1.0, 0.25, 0.0]), (5, [1.0, 1.0, 1.0, 0.5]), (6, [1.0, 1.0, 1.0, 0.875])]]}
  with open(exits.depth_path(results, "propagation", 0), "w") as f:
    json.dump(depth, f)
  with open(exits.depth_path(results, "propagation", 0, rung="ztt+inject"), "w") as f:
    json.dump(dict(depth, rung="ztt+inject", points=depth["points"][:1]), f)

  blocks = report.build_blocks(out, docs)

  with open(os.path.join(results, "default_vanilla.txt")) as f:  # what make train prints after the default run
    assert "(2 seeds, mean)" in f.read()
  rows = [l for l in blocks["ladder_propagation"].splitlines() if l.startswith("| `")]
  assert "acc % @ d=2" in blocks["ladder_propagation"] and "70.0 ± 10.0" in rows[1]  # ztt at d=2
  bake = blocks["cycles_by_difficulty_propagation"].splitlines()
  assert bake[0] == "Seed 0:" and "cycles @ d=1 | cycles @ d=2 | acc @ d=1 | acc @ d=2" in bake[2]
  assert [r.split("|")[1].strip() for r in bake[4:]] == ["fixed", "zero_attention", "state_delta"]
  assert "| 1.50 | 2.75 | 100.0% | 75.0% |" in bake[-1]
  assert "| state_delta | tau=0.01 |" in blocks["exit_propagation_s0"]
  d = blocks["depth_propagation"].splitlines()
  assert d[2] == "| cycles | all | d=1 | d=2 | d=3 (untrained) | d=4 (untrained) |"
  assert d[4] == "| 3 (trained) | 56.2% | 100.0% | 100.0% | 25.0% | 0.0% |"
  # a recipe rung's depth has its own block, not mixed into the ztt's
  assert blocks["depth_propagation_ztt+inject"].splitlines()[2] == d[4] and "ztt+inject" not in blocks["depth_propagation"]
  for png in ("depth_propagation.png", "ladder_propagation.png", "cycles_by_difficulty_propagation.png"):
    assert os.path.isfile(os.path.join(docs, png)), png


def _ladder(root, seeds, steps):
  for seed in range(seeds):
    _fake_run(str(root), "multihop", "ztt", seed, 1.0 + seed, 0.5, steps=steps)
    _fake_run(str(root), "multihop", "vanilla-4", seed, 2.0 + seed, 0.3, steps=steps)
  return str(root)


def _snapshot(d):
  return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(pathlib.Path(d).rglob("*")) if p.is_file()}


def test_report_writes_into_out_by_default_and_marks_what_it_wrote(tmp_path, capsys):
  out = _ladder(tmp_path / "runs", seeds=1, steps=10)
  report.write_all(out)
  dest = tmp_path / "runs" / "report"
  assert json.loads((dest / "results" / "ladder_multihop.json").read_text())["written_by"] == published.MARKER
  assert published.png_text(dest / "ladder_multihop.png")["written_by"] == published.MARKER
  md = (dest / "results.md").read_text()  # created: nothing but the blocks, filled
  assert "<!-- auto:ladder_multihop -->\n| rung |" in md and "`ztt`" in md
  assert f"report written to {dest}" in capsys.readouterr().out
  report.write_all(out)  # its own files it replaces
  import matplotlib.image
  assert matplotlib.image.imread(str(dest / "ladder_multihop.png")).ndim == 3  # the stamp left a valid PNG


def test_report_never_touches_a_file_it_did_not_write(tmp_path):
  out = _ladder(tmp_path / "runs", seeds=1, steps=10)
  docs = tmp_path / "mine"
  (docs / "results").mkdir(parents=True)
  (docs / "results.md").write_text("# my notes, no blocks\n")
  (docs / "results" / "ladder_multihop.json").write_text('{"task": "multihop", "mine": true}')
  import matplotlib.pyplot as plt
  plt.figure().savefig(docs / "ladder_multihop.png")  # someone's Matplotlib plot of the same name
  plt.close("all")
  before = _snapshot(docs)
  for overwrite in (False, True):
    with pytest.raises(OutputError, match=r"ladder_multihop\.json exists and was not written by the report"):
      report.write_all(out, str(docs), overwrite=overwrite)
    assert _snapshot(docs) == before
  (docs / "results" / "ladder_multihop.json").unlink()
  with pytest.raises(OutputError, match=r"ladder_multihop\.png exists and was not written by the report"):
    report.write_all(out, str(docs))
  # From the command line: one line, exit 2, nothing written.
  before = _snapshot(docs)
  proc = subprocess.run([sys.executable, "-m", "ztt_jax.experiments.ablation", "--report", f"--out={out}",
                         f"--docs={docs}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and "was not written by the report" in proc.stderr.strip().splitlines()[-1]
  assert _snapshot(docs) == before


def test_a_smaller_ladder_does_not_replace_a_bigger_published_one_unless_overwrite(tmp_path):
  docs = tmp_path / "docs"
  (docs / "results").mkdir(parents=True)
  (docs / "results.md").write_text("prose\n<!-- auto:ladder_multihop -->\n<!-- /auto:ladder_multihop -->\nmore prose\n")
  report.write_all(_ladder(tmp_path / "big", seeds=2, steps=10), str(docs))
  summary_path = docs / "results" / "ladder_multihop.json"
  # What reports wrote before the marker existed is recognised as theirs by its structure.
  legacy = json.loads(summary_path.read_text())
  del legacy["written_by"]
  summary_path.write_text(json.dumps(legacy))
  before = _snapshot(docs)
  for seeds, steps in ((1, 10), (2, 2)):  # fewer seeds (and runs); fewer steps
    small = _ladder(tmp_path / f"small_{seeds}_{steps}", seeds=seeds, steps=steps)
    with pytest.raises(OutputError, match=r"holds a ladder of 4 runs, 2 seeds, 10 steps, more than this report's"):
      report.write_all(small, str(docs))
    assert _snapshot(docs) == before
  # The results.md block alone (its JSON gone) is enough to refuse.
  summary_path.unlink()
  with pytest.raises(OutputError, match=r"results\.md \(block ladder_multihop\) holds a ladder of 4 runs"):
    report.write_all(small, str(docs))
  report.write_all(small, str(docs), overwrite=True)
  assert json.loads(summary_path.read_text())["budget"] == {
      "steps": 2, "tokens_per_step": 64, "tokens_per_run": 128, "runs": 4, "train_wall_s_total": 24.0}
  md = (docs / "results.md").read_text()
  assert md.startswith("prose\n") and md.endswith("more prose\n") and "Budget 2 steps x 64 tokens" in md


def test_the_published_results_are_recognised_as_the_reports():
  docs = ROOT / "docs"
  s = published.load_json(docs / "results" / "ladder_text.json")
  assert published.is_summary(s) and published.ladder_size(s) == {"runs": 15, "seeds": 3, "steps": 2000}
  for png in ("ladder_text.png", "exit_text.png"):
    assert published.not_ours(str(docs / png), str(docs)) is None, png
  assert published.not_ours(str(docs / "results" / "default_vanilla.txt"), str(docs)) is None
  assert published.block_size(report.ladder_table(s)) == published.ladder_size(s)

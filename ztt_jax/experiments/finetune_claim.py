"""The paper's fine-tuning claim, measured: turn a pre-trained Llama-form model into a ZTT.

  python -m ztt_jax.experiments.finetune_claim --data=../shared/data/tinyshakespeare.txt --out=runs/finetune_claim
      [--seeds=3] [--stages=teacher,roundtrip,convert,finetune,controls,exits]
      [--teacher_steps=4000 --finetune_steps=1000 --control_steps=5000] [--finetune_lr=1e-3]
  python -m ztt_jax.experiments.finetune_claim --report --out=runs/finetune_claim [--docs=docs] [--overwrite]

Every run is at the text ladder's width and budget (ladder.rung_config(task="text"): d_model 128, 4
heads, MLP 512, 64 bytes x 12 per step, nanoGPT's loss protocol on the held-out tail), in Llama
form (RMSNorm, RoPE, SwiGLU, no biases) with 2 kv heads and an untied LM head. Stages, in order:

  teacher    the vanilla-8 rung trained --teacher_steps (seed 0), exported (ztt_jax.export)
  roundtrip  the export -> a Hugging Face Llama directory (convert.hf_llama) -> transformers'
             LlamaForCausalLM; logits on held-out windows must agree to 1e-4
  convert    that directory imported as a ZTT 1 + 2x3 + 1 four ways (ARMS); held-out loss before any
             fine-tuning and the parameter counts
  finetune   each conversion fine-tuned --finetune_steps per seed (init_from, as configs/finetune.py)
  controls   vanilla-4, ztt and ztt+inject from scratch at --control_steps (= teacher + fine-tune
             tokens at the defaults) per seed
  exits      the exit bake-off (evaluator.sweep, as experiments/exits.py) on every seed of the
             fine-tuned arm with the lowest mean loss

Seeds: a control's seed is its init seed (same data order for all, as the ladder). A fine-tune starts
from fixed params (the LoRA deltas too: an SVD), so its seed is the data order: data.seed = 1 + seed
(the teacher used 0). Deep supervision (cycle_loss_weight 0.5, the ladder's) stays on when
fine-tuning, so the converted model has a trained read-out after each cycle for the exit rules and
is trained like the ztt controls; --finetune_cycle_loss_weight=0 turns it off.

Resumable: each run writes its result JSON only when finished, and a rerun skips it (and resumes a
half-trained run from its checkpoint). A finished run of another budget is an error naming --out.
The report (experiments/claim_report.py) writes into --out unless --docs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time

import jax
import numpy as np

from ztt_jax.config import Config, parse
from ztt_jax.errors import ConfigError
from ztt_jax.experiments.claim_plan import ARMS, CONTROLS, TEACHER, best_arm, read_json, results
from ztt_jax.experiments.claim_report import write_report
from ztt_jax.experiments.ladder import CYCLE_LOSS_WEIGHT, rung_config, run_name
from ztt_jax.experiments.runs import RESULT, finished

KV_HEADS = 2
LAYOUT = dict(num_cycles=3, n_middle_layers=2)  # 1 + 2x3 + 1: the ztt rung's layout
STAGES = ("teacher", "roundtrip", "convert", "finetune", "controls", "exits")
ROUNDTRIP_TOL = 1e-4
ROUNDTRIP_BATCHES = 4  # of nanoGPT's 12 held-out windows each


@dataclasses.dataclass(frozen=True)
class Plan:
  data: str
  out: str
  seeds: int = 3
  teacher_steps: int = 4000
  finetune_steps: int = 1000
  control_steps: int = 5000
  finetune_lr: float = 1e-3
  finetune_cycle_loss_weight: float = CYCLE_LOSS_WEIGHT

  def path(self, *parts) -> str:
    return os.path.join(self.out, *parts)


# ------------------------------------------------------------------ configs

def llama_form(cfg: Config) -> Config:
  """A ladder config in Llama form: KV_HEADS kv heads, untied LM head; the ladder's base must
  already be RMSNorm/RoPE/SwiGLU without biases (what a Llama directory holds)."""
  m = cfg.model
  wrong = {k: v for k, v in dict(norm=m.norm, position=m.position, mlp=m.mlp, use_bias=m.use_bias).items()
           if v != dict(norm="rmsnorm", position="rope", mlp="swiglu", use_bias=False)[k]}
  if wrong:
    raise ConfigError(f"the ladder's base model is not Llama form ({wrong}); set base_config's model to "
                      "norm=rmsnorm, position=rope, mlp=swiglu, use_bias=False.")
  return parse(dataclasses.replace(cfg, model=m.replace(num_kv_heads=KV_HEADS, tie_embeddings=False)))


def teacher_config(plan: Plan) -> Config:
  return llama_form(rung_config("text", TEACHER, 0, data_path=plan.data, steps=plan.teacher_steps))


def control_config(plan: Plan, rung: str, seed: int) -> Config:
  return llama_form(rung_config("text", rung, seed, data_path=plan.data, steps=plan.control_steps))


def finetune_config(plan: Plan, export_dir: str, seed: int) -> Config:
  """The ladder's text run (budget, eval, logging) around an export's model, started from its params:
  configs/finetune.py's logic at the ladder's batch and width."""
  from ztt_jax import export
  cfg = rung_config("text", "ztt", seed, data_path=plan.data, steps=plan.finetune_steps)
  model = export.load(export_dir)[0].cfg.replace(
      cycle_loss_weight=plan.finetune_cycle_loss_weight, exit_threshold=None)
  return parse(dataclasses.replace(
      cfg, model=model, init_from=os.path.abspath(export_dir),
      data=dataclasses.replace(cfg.data, seed=1 + seed),
      train=dataclasses.replace(cfg.train, learning_rate=plan.finetune_lr)))


def check_plan(plan: Plan, stages) -> None:
  """Every flag and every config that can be built before training, so a typo fails now."""
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ConfigError(f"--stages: unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
  if not os.path.exists(plan.data):
    raise ConfigError(f"--data={plan.data}: no such file or folder; give the training text")
  if not plan.finetune_lr > 0 or not plan.finetune_cycle_loss_weight >= 0:
    raise ConfigError("--finetune_lr must be > 0 and --finetune_cycle_loss_weight >= 0")
  teacher_config(plan)
  for rung in CONTROLS:
    control_config(plan, rung, 0)


# ------------------------------------------------------------------ what every record carries

def hardware() -> dict:
  from ztt_jax.flops import cpu_model
  d = jax.devices()[0]
  return {"platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count(),
          "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
          "jax_backend": d.platform, "device_kind": d.device_kind, "devices": jax.device_count(),
          "jax": jax.__version__}


def param_counts(params) -> dict:
  """total; layers: everything but the embedding, LM head and final norm (the zero pools and LoRA
  deltas included); lora: the per-cycle deltas alone."""
  total = layers = lora = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    n = int(np.prod(leaf.shape))
    total += n
    layers += n if names[0] not in ("embed", "final_norm") else 0
    lora += n if any("lora" in x for x in names) else 0
  return {"total": total, "layers": layers, "lora": lora}


def _config_counts(cfg: Config) -> dict:
  from ztt_jax import run as run_lib
  return param_counts(run_lib.build(cfg).abstract_state.params)


def write_json(obj: dict, path: str) -> None:
  """Whole or not at all: a result file's presence means its stage finished."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _done(workdir: str, steps: int, flag: str) -> bool:
  """finished(workdir), refusing one trained for another budget (a smoke run's OUT reused)."""
  if not finished(workdir):
    return False
  got = read_json(os.path.join(workdir, RESULT))["steps"]
  if got != steps:
    raise ConfigError(f"{workdir} finished at {got} steps, not {flag}={steps}; pass another --out (or "
                      f"{flag}={got}).")
  return True


def _train(cfg: Config, workdir: str, meta: dict, log) -> bool:
  """Trains and records (runs.train_and_record); False if it was stopped (rerun to resume)."""
  from ztt_jax.experiments.runs import train_and_record
  name = os.path.relpath(workdir, os.path.dirname(os.path.dirname(workdir)))
  log(f"{name}: training {cfg.train.steps} steps ({time.strftime('%H:%M:%S')})")
  meta = {**meta, "param_counts": _config_counts(cfg), "hardware": hardware()}
  r = train_and_record(cfg, workdir, meta)
  if "preempted_at" in r:
    log(f"{name}: stopped at step {r['preempted_at']}; rerun the command to resume")
    return False
  log(f"{name}: nanoGPT-protocol loss {r['nanogpt_eval_loss']:.4f} in {r['wall_s']:.0f}s "
      f"({r['wall_s'] / cfg.train.steps * 1e3:.0f} ms/step)")
  return True


# ------------------------------------------------------------------ stages

def stage_teacher(plan: Plan, log) -> bool:
  from ztt_jax import restore
  workdir = plan.path("teacher")
  if _done(workdir, plan.teacher_steps, "--teacher_steps"):
    log("teacher: done, skipped")
  elif not _train(teacher_config(plan), workdir, {"stage": "teacher", "rung": TEACHER, "seed": 0}, log):
    return False
  if not os.path.isfile(plan.path("teacher_export", "config.json")):  # export.save is atomic
    restore.export_run(workdir, plan.path("teacher_export"), overwrite=True)
    log(f"teacher: exported to {plan.path('teacher_export')}")
  return True


def _need(path: str, stage: str) -> None:
  if not os.path.exists(path):
    raise ConfigError(f"{path} is missing: run --stages={stage} first (or leave --stages out)")


def stage_roundtrip(plan: Plan, log) -> bool:
  """Teacher export -> HF Llama dir -> transformers; logits on held-out windows to ROUNDTRIP_TOL."""
  out = plan.path("roundtrip.json")
  if os.path.isfile(out):
    log("roundtrip: done, skipped")
    return True
  _need(plan.path("teacher_export", "config.json"), "teacher")
  import torch
  import transformers
  from ztt_jax import export
  from ztt_jax.convert import hf_llama
  from ztt_jax.experiments.runs import nanogpt_batches
  hf_dir = hf_llama.export_hf(plan.path("teacher_export"), plan.path("teacher_hf"), overwrite=True)
  model, params = export.load(plan.path("teacher_export"))
  ours = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
  hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()  # float32, as exported
  diff, scale = 0.0, 0.0
  for b in nanogpt_batches(teacher_config(plan), num_batches=ROUNDTRIP_BATCHES):
    a = np.asarray(ours(params, b["inputs"]))
    with torch.no_grad():
      h = hf(torch.tensor(np.asarray(b["inputs"]), dtype=torch.long)).logits.numpy()
    diff, scale = max(diff, float(np.abs(a - h).max())), max(scale, float(np.abs(h).max()))
  if not diff < ROUNDTRIP_TOL:
    raise RuntimeError(f"roundtrip: transformers' logits differ from ours by {diff:.3g} (> {ROUNDTRIP_TOL}) on "
                       f"{hf_dir}; the Llama export is wrong, fix ztt_jax/convert/hf_llama.py first")
  write_json({"max_abs_logit_diff": diff, "max_abs_logit": scale, "tolerance": ROUNDTRIP_TOL,
              "windows": ROUNDTRIP_BATCHES * 12, "hf_dir": hf_dir, "transformers": transformers.__version__,
              "hardware": hardware()}, out)
  log(f"roundtrip: max |logit diff| {diff:.2e} over {ROUNDTRIP_BATCHES * 12} windows (logits up to {scale:.1f})")
  return True


def held_out_loss(cfg: Config, export_dir: str) -> float:
  """nanoGPT-protocol loss of an export's params under `cfg` (runs.nanogpt_batches), before training."""
  from ztt_jax import evaluator, restore
  from ztt_jax import run as run_lib
  from ztt_jax.experiments.runs import nanogpt_batches
  run = run_lib.build(cfg)
  trained = restore.TrainedRun(cfg, run, restore.load_init_params(export_dir, run), 0)
  return evaluator.evaluate(trained, batches=nanogpt_batches(cfg))["loss"]


def stage_convert(plan: Plan, log) -> bool:
  from ztt_jax import export
  from ztt_jax.convert import hf_llama
  _need(plan.path("teacher_hf", "config.json"), "roundtrip")
  teacher = param_counts(export.load(plan.path("teacher_export"))[1])
  for arm, kw in ARMS.items():
    out = plan.path("convert", f"{arm}.json")
    if os.path.isfile(out):
      log(f"convert {arm}: done, skipped")
      continue
    t0 = time.perf_counter()
    d = hf_llama.import_hf(plan.path("teacher_hf"), plan.path("convert", arm), to="ztt", overwrite=True,
                           **LAYOUT, **kw)
    counts = param_counts(export.load(d)[1])
    loss = held_out_loss(finetune_config(plan, d, 0), d)
    write_json({"arm": arm, **kw, **LAYOUT, "export": d, "nanogpt_eval_loss": loss, "param_counts": counts,
                "teacher_param_counts": teacher, "layer_fraction": counts["layers"] / teacher["layers"],
                "wall_s": time.perf_counter() - t0, "hardware": hardware()}, out)
    log(f"convert {arm}: loss before fine-tuning {loss:.4f}, layer params {counts['layers']:,} "
        f"({counts['layers'] / teacher['layers']:.0%} of the teacher's)")
  return True


def stage_finetune(plan: Plan, log) -> bool:
  for seed in range(plan.seeds):  # seed-major: a stopped stage has every arm at seed 0 first
    for arm in ARMS:
      workdir = plan.path("finetune", run_name(arm, seed))
      if _done(workdir, plan.finetune_steps, "--finetune_steps"):
        log(f"finetune/{run_name(arm, seed)}: done, skipped")
        continue
      _need(plan.path("convert", f"{arm}.json"), "convert")
      cfg = finetune_config(plan, plan.path("convert", arm), seed)
      meta = {"stage": "finetune", "arm": arm, "seed": seed, "data_seed": cfg.data.seed, **ARMS[arm],
              "learning_rate": cfg.train.learning_rate, "cycle_loss_weight": cfg.model.cycle_loss_weight}
      if not _train(cfg, workdir, meta, log):
        return False
  return True


def stage_controls(plan: Plan, log) -> bool:
  for seed in range(plan.seeds):
    for rung in CONTROLS:
      workdir = plan.path("controls", run_name(rung, seed))
      if _done(workdir, plan.control_steps, "--control_steps"):
        log(f"controls/{run_name(rung, seed)}: done, skipped")
        continue
      if not _train(control_config(plan, rung, seed), workdir, {"stage": "controls", "rung": rung, "seed": seed}, log):
        return False
  return True


def sweep_path(plan_out: str, arm: str, seed: int) -> str:
  return os.path.join(plan_out, "exits", f"sweep_{arm}_s{seed}.json")


def stage_exits(plan: Plan, log) -> bool:
  from ztt_jax import evaluator, restore
  from ztt_jax.experiments.exits import MAX_BATCHES
  arm = best_arm(results(plan.path("finetune")))
  if arm is None:
    raise ConfigError(f"no finished fine-tune under {plan.path('finetune')}: run --stages=finetune first")
  for seed in range(plan.seeds):
    workdir, out = plan.path("finetune", run_name(arm, seed)), sweep_path(plan.out, arm, seed)
    if os.path.isfile(out) or not finished(workdir):
      log(f"exits {arm} seed {seed}: {'done' if os.path.isfile(out) else 'not fine-tuned'}, skipped")
      continue
    t0 = time.perf_counter()
    sw = evaluator.sweep(restore.load_trained(workdir), num_thresholds=8, max_batches=MAX_BATCHES["text"])
    sw.update(task="text", arm=arm, seed=seed, workdir=workdir, wall_s=time.perf_counter() - t0)
    write_json(sw, out)
    log(f"exits {arm} seed {seed}: {len(sw['points'])} points in {sw['wall_s']:.0f}s")
  return True


STAGE_FNS = {"teacher": stage_teacher, "roundtrip": stage_roundtrip, "convert": stage_convert,
             "finetune": stage_finetune, "controls": stage_controls, "exits": stage_exits}


def run(plan: Plan, stages=STAGES, log=print) -> bool:
  """The stages in STAGES order; False if one was stopped (SIGTERM / Ctrl-C): rerun the same
  command to resume. Every record carries its own budget, so the report needs no plan file."""
  check_plan(plan, stages)
  os.makedirs(plan.out, exist_ok=True)
  for stage in STAGES:
    if stage in stages and not STAGE_FNS[stage](plan, log):
      return False
  return True


# ------------------------------------------------------------------ command line

def main(argv):
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f"unexpected argument(s) {argv[1:]}; every option is a --flag (--helpshort lists them)")
  f = flags.FLAGS
  if f.report:
    write_report(f.out, f.docs, overwrite=f.overwrite, log=lambda s: print(s, flush=True))
    return
  if not f.data:
    raise app.UsageError("--data=PATH: the training text (the last 10% is held out), or --report")
  plan = Plan(data=f.data, out=f.out, seeds=f.seeds, teacher_steps=f.teacher_steps, finetune_steps=f.finetune_steps,
              control_steps=f.control_steps, finetune_lr=f.finetune_lr,
              finetune_cycle_loss_weight=f.finetune_cycle_loss_weight)
  # Seeds of a run compile identical programs; the persistent cache turns the repeats into loads.
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(f.out), ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  if run(plan, f.stages, log=lambda s: print(s, flush=True)):
    print(f"done; the report: python -m ztt_jax.experiments.finetune_claim --report --out={f.out}", flush=True)


def _define_flags():
  from absl import flags
  flags.DEFINE_string("data", None, "Training text (the last 10% is held out).")
  flags.DEFINE_string("out", "runs/finetune_claim", "Root of every run, export and result of the experiment.")
  flags.DEFINE_integer("seeds", 3, "Seeds per fine-tuned arm and per control.", lower_bound=1)
  flags.DEFINE_list("stages", list(STAGES), "Stages to run, in their fixed order.")
  flags.DEFINE_integer("teacher_steps", 4000, "The vanilla-8 teacher's steps (x 12 x 64 bytes).", lower_bound=1)
  flags.DEFINE_integer("finetune_steps", 1000, "Fine-tuning steps per conversion and seed.", lower_bound=1)
  flags.DEFINE_integer("control_steps", 5000, "Steps of each from-scratch control (default: teacher + fine-tune).",
                       lower_bound=1)
  flags.DEFINE_float("finetune_lr", 1e-3, "Peak fine-tuning learning rate (warmup + cosine, as the ladder's).")
  flags.DEFINE_float("finetune_cycle_loss_weight", CYCLE_LOSS_WEIGHT, "Deep supervision weight when "
                     "fine-tuning (the ladder's; 0: off).")
  flags.DEFINE_bool("report", False, "Write the report of --out (trains nothing).")
  flags.DEFINE_string("docs", None, "--report: publish into this directory (e.g. docs) instead of --out, "
                      "replacing only files the report wrote.")
  flags.DEFINE_bool("overwrite", False, "--report --docs: replace a published run bigger than this one.")


if __name__ == "__main__":
  from ztt_jax import cli
  _define_flags()
  cli.run(main)

"""How close does a GPT-2 converted to a ZTT start, and how fast does fine-tuning recover?

No pre-trained weights are reachable offline, so the "pre-trained GPT-2" is made here: a 6-layer
GPT-2-form `vanilla` model (configs/text.py:vanilla with norm=layernorm, position=learned,
mlp=gelu, use_bias=True) trained briefly on a text file. Then, through the real tools:

  export (ztt_jax.export) -> Hugging Face directory (convert.hf_gpt2 --export_hf)
  -> import back --to=vanilla (a round-trip check), --to=ztt --middle_init=copy, --to=ztt --middle_init=average
  -> held-out loss of each before any fine-tuning
  -> a short fine-tune of each with --config.init_from (configs/finetune.py), held-out loss after.

The vanilla import fine-tuned for the same steps is the control: it separates "the ZTT recovers"
from "more training helps anyway".

  nice -n 10 .venv/bin/python benchmarks/gpt2_finetune.py --text=/work/shared/data/tinyshakespeare.txt

About 5-10 minutes on 2 CPU cores with the defaults. Writes OUT/results.json and prints a table.
"""
import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from ztt_jax import config as config_lib  # noqa: E402
from ztt_jax import data as data_lib  # noqa: E402
from ztt_jax import evaluator, export, restore, run as run_lib, trainer  # noqa: E402
from ztt_jax.convert import hf_gpt2  # noqa: E402


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def common(cd, args):
  """Same data, batch and eval set for every run, so the losses compare."""
  cd.data.path = args.text
  cd.data.seq_len = 128
  cd.data.eval_fraction = 0.1
  cd.train.global_batch_size = 16
  cd.eval.max_batches = args.eval_batches
  cd.log.tensorboard = False
  cd.log.every_steps = 50
  return cd


def eval_loss(export_dir, args):
  """Held-out loss of an export's params, before any training."""
  cfg = config_lib.parse(common(load_config("finetune", export_dir), args))
  run = run_lib.build(cfg)
  batches = list(data_lib.make_eval_batches(cfg.data, global_batch_size=cfg.train.global_batch_size,
                                            vocab_size=cfg.model.vocab_size, max_batches=cfg.eval.max_batches))
  return evaluator.Evaluator(run, batches)(restore.load_init_params(export_dir, run))["eval/loss"]


def finetune(export_dir, workdir, args):
  cd = common(load_config("finetune", export_dir), args)
  cd.train.steps = args.finetune_steps
  cd.train.learning_rate = args.finetune_lr
  cd.train.warmup_steps = min(20, args.finetune_steps // 5)
  cd.checkpoint.every_steps = cd.eval.every_steps = args.finetune_steps
  return trainer.train(config_lib.parse(cd), workdir)["eval/loss"]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--text", default="/work/shared/data/tinyshakespeare.txt")
  p.add_argument("--out", default=str(ROOT / "runs" / "gpt2_finetune"))
  p.add_argument("--pretrain_steps", type=int, default=300)
  p.add_argument("--finetune_steps", type=int, default=100)
  p.add_argument("--finetune_lr", type=float, default=3e-4)
  p.add_argument("--num_cycles", type=int, default=2)
  p.add_argument("--eval_batches", type=int, default=16)
  args = p.parse_args()
  out = pathlib.Path(args.out)
  if out.exists():
    shutil.rmtree(out)
  t0 = time.time()

  # 1. the "pre-trained GPT-2": 6 layers (1 + 4 + 1, all unique and run once)
  cd = common(load_config("text", "vanilla"), args)
  cd.model.update(dict(norm="layernorm", position="learned", mlp="gelu", use_bias=True,
                       n_head_layers=1, n_middle_layers=4, n_tail_layers=1))
  cd.train.steps = args.pretrain_steps
  cd.checkpoint.every_steps = cd.eval.every_steps = args.pretrain_steps
  pre = trainer.train(config_lib.parse(cd), str(out / "pretrain"))

  # 2. through the tools: export -> HF -> import back three ways
  ours = restore.export_run(str(out / "pretrain"), str(out / "export"))
  hf_dir = hf_gpt2.export_hf(ours, str(out / "hf"))
  imports = {"vanilla (round trip)": hf_gpt2.import_hf(hf_dir, str(out / "vanilla"), to="vanilla")}
  for mode in ("copy", "average"):
    imports[f"ztt {mode}"] = hf_gpt2.import_hf(hf_dir, str(out / f"ztt_{mode}"), to="ztt",
                                               num_cycles=args.num_cycles, middle_init=mode)

  # 3. loss before fine-tuning, then after a short fine-tune from the converted params
  rows = {}
  for name, path in imports.items():
    m = export.load(path)[0].cfg
    rows[name] = {"layout": f"{m.n_head_layers}+{m.n_middle_layers}x{m.cycles}+{m.n_tail_layers}",
                  "before": eval_loss(path, args),
                  "after": finetune(path, str(out / f"ft_{pathlib.Path(path).name}"), args)}
  result = {"pretrain_steps": args.pretrain_steps, "pretrain_eval_loss": pre["eval/loss"],
            "finetune_steps": args.finetune_steps, "finetune_lr": args.finetune_lr, "rows": rows,
            "seconds": time.time() - t0}
  (out / "results.json").write_text(json.dumps(result, indent=2))
  print(f"\npre-trained 6-layer GPT-2-form model, {args.pretrain_steps} steps: eval loss "
        f"{pre['eval/loss']:.4f} nats/byte")
  print(f"| model | layers (head+k x C+tail) | eval loss before fine-tuning | after {args.finetune_steps} steps |")
  print("|---|---|---|---|")
  for name, r in rows.items():
    print(f"| {name} | {r['layout']} | {r['before']:.4f} | {r['after']:.4f} |")
  print(f"({result['seconds']:.0f} s; {out / 'results.json'})")


if __name__ == "__main__":
  main()

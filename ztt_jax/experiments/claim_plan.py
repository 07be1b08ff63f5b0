"""What the fine-tuning claim compares, and how its finished runs are read back: shared by the
experiment (finetune_claim.py) and its report (claim_report.py)."""
from __future__ import annotations

import json
import os

from ztt_jax.experiments.runs import RESULT, finished

TEACHER = "vanilla-8"
ARMS = {"copy": dict(middle_init="copy", lora_rank=0),
        "average": dict(middle_init="average", lora_rank=0),
        "average+lora8": dict(middle_init="average", lora_rank=8),
        "average+lora32": dict(middle_init="average", lora_rank=32)}
# Cheapest first, then the strongest from-scratch rung of the text ladder: a run cut short still
# has the two that bound the claim (equal unique parameters; the best looped recipe).
CONTROLS = ("vanilla-4", "ztt+inject", "ztt")
GOAL_NATS = 0.03


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def results(directory: str) -> list[dict]:
  """The result.json of every finished run under `directory`."""
  if not os.path.isdir(directory):
    return []
  return [read_json(os.path.join(directory, n, RESULT)) for n in sorted(os.listdir(directory))
          if finished(os.path.join(directory, n))]


def best_arm(finetuned: list[dict]):
  """The arm with the lowest mean fine-tuned loss over its finished seeds (None if none finished)."""
  by = {}
  for r in finetuned:
    by.setdefault(r["arm"], []).append(r["nanogpt_eval_loss"])
  return min(by, key=lambda a: sum(by[a]) / len(by[a])) if by else None

"""Sample from a checkpoint with a KV cache and per-token early exit (see ztt_jax/decoding.py).

  python -m ztt_jax.generate --workdir=DIR --prompt="..." [--max_new_tokens=N --temperature=T
      --top_k=K --top_p=P --exit_threshold=TAU|none --seed=S --step=N]

Prints the prompt and its continuation, then one line of statistics (tokens, mean cycles per new
token, tokens/s of the compiled program; the first call includes compilation).
"""
from __future__ import annotations

import time

import jax
import numpy as np

from ztt_jax import cli
from ztt_jax.data.config import SYNTHETIC_KINDS
from ztt_jax.errors import ConfigError


def encode_prompt(cfg, prompt: str | None, prompt_ids: str | None, bos: str = "auto"):
  """Token ids of the prompt and the tokenizer to decode the output with (None: print ids)."""
  from ztt_jax.data import BOS_ID, load_tokenizer
  if (prompt is None) == (prompt_ids is None):
    raise ConfigError("give exactly one of --prompt (text) and --prompt_ids (comma-separated token ids)")
  kind = cfg.data.kind
  tokenizer = load_tokenizer(cfg.data.tokenizer) if kind in SYNTHETIC_KINDS + ("text",) else None
  if prompt_ids is not None:
    try:
      ids = [int(t) for t in prompt_ids.split(",") if t.strip()]
    except ValueError:
      raise ConfigError(f"--prompt_ids={prompt_ids!r}: use comma-separated integers, e.g. 257,120,61") from None
  else:
    if tokenizer is None:
      raise ConfigError(f"this run trained on pre-tokenized data (data.kind={kind!r}), so its tokenizer is "
                        "unknown; pass --prompt_ids=ID,ID,... instead of --prompt")
    ids = [int(t) for t in tokenizer.encode(prompt)]
  # Rows of the embedded tasks start with BOS; byte text windows do not.
  if bos == "yes" or (bos == "auto" and kind in SYNTHETIC_KINDS):
    ids = [BOS_ID] + ids
  if not ids:
    raise ConfigError("the prompt is empty; give at least one character or id")
  return np.asarray(ids, np.int64), tokenizer


def main(argv):
  del argv
  from absl import flags
  from ztt_jax import decoding
  FLAGS = flags.FLAGS
  # Decoding exits per token: a decoding step has no later tokens to wait for.
  trained, rule = cli.load_trained_run(devices=jax.devices()[:1], granularity="token")
  cfg = trained.cfg
  ids, tokenizer = encode_prompt(cfg, FLAGS.prompt, FLAGS.prompt_ids, FLAGS.bos)
  eos = None if FLAGS.ignore_eos or tokenizer is None else tokenizer.eos_id
  sampling = decoding.Sampling(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                               seed=FLAGS.seed)
  t0 = time.perf_counter()
  gen = decoding.generate(trained.run.model, trained.params, ids, max_new_tokens=FLAGS.max_new_tokens,
                          sampling=sampling, rule=rule, eos_id=eos)
  dt = time.perf_counter() - t0
  new = gen.tokens[0, :gen.num_new]
  if eos is not None and (new == eos).any():
    new = new[: int(np.argmax(new == eos))]
  if tokenizer is not None:
    print(tokenizer.decode(ids) + tokenizer.decode(new))
  else:
    print(",".join(map(str, ids.tolist())) + " | " + ",".join(map(str, new.tolist())))
  cyc = gen.step_cycles[0, :gen.num_new]
  print(f"[{gen.num_new} tokens in {dt:.2f}s incl. compile | mean cycles per new token {cyc.mean():.2f} of "
        f"{cfg.model.cycles} | exit_threshold {rule.threshold}]")


def _define_flags():
  from absl import flags
  cli.define_trained_run_flags()  # --workdir, --step, --exit_threshold, --frozen_kv
  flags.DEFINE_string("prompt", None, "Prompt text (encoded with the run's tokenizer).")
  flags.DEFINE_string("prompt_ids", None, "Prompt as comma-separated token ids (pre-tokenized runs).")
  flags.DEFINE_enum("bos", "auto", ["auto", "yes", "no"], "Prepend BOS (auto: for the multi-hop task).")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate (prompt + these <= model.max_seq_len).")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 = greedy.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = off).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1 = off).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_bool("ignore_eos", False, "Keep generating after EOS.")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)  # one-line errors (exit 2: flags, config, data; 1: checkpoints), --verbose

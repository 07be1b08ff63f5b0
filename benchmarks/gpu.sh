#!/usr/bin/env bash
# The GPU benchmark: one command on a machine with one GPU, at most 8 minutes, no network.
#
#   benchmarks/gpu_wheels.sh                 # first, on a machine with PyPI: build/gpu_wheels/ (~8 MiB)
#   benchmarks/gpu.sh [OUT_DIR]              # then on the GPU machine, from a checkout with build/gpu_wheels/
#
# Results: OUT_DIR/gpu_bench.json (default $OUT, else build/gpu_bench) and a table on stdout; the
# log of each phase is in OUT_DIR too. What it measures is in benchmarks/gpu_bench.py's docstring.
#
# It uses the machine's own Python and its preinstalled jax/jaxlib (+ CUDA plugin), flax, optax,
# orbax-checkpoint and tensorstore. The packages those lack come from the wheel bundle, installed
# offline (pip --no-index) into a venv created with --system-site-packages, so the preinstalled
# jax stays the one imported. Fallbacks, in order, when the machine lacks what that needs:
#   no venv module / ensurepip  -> pip install --target DIR, on PYTHONPATH
#   no pip                      -> the wheels unzipped into DIR (they are plain zip archives)
# ztt_jax itself is not installed: the checkout is put on PYTHONPATH.
#
# Environment: PYTHON (default python3), ZTT_GPU_WHEELS (default build/gpu_wheels),
# ZTT_GPU_BUDGET_S (total seconds, default 470), GPU_BENCH_ARGS (extra driver flags, e.g. --tiny).
set -uo pipefail
T0=$(date +%s)
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT_DIR=${1:-${OUT:-build/gpu_bench}}
WHEELS=${ZTT_GPU_WHEELS:-build/gpu_wheels}
PY=${PYTHON:-python3}
TOTAL_S=${ZTT_GPU_BUDGET_S:-470}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
ENV_DIR=${TMPDIR:-/tmp}/ztt_gpu_env
LOG="$OUT_DIR/setup.log"
: > "$LOG"
say() { echo "[gpu.sh $(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

if [[ ! -d "$WHEELS" ]]; then
  say "no wheel bundle at $WHEELS: run benchmarks/gpu_wheels.sh on a machine with network first"
  exit 2
fi
say "python: $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)')"

# --------------------------------------------------------------------------- install the bundle
RUN_PY=""
EXTRA_PATH=""
rm -rf "$ENV_DIR"
if "$PY" -m venv --system-site-packages "$ENV_DIR/venv" >>"$LOG" 2>&1 && [[ -x "$ENV_DIR/venv/bin/python" ]] \
   && "$ENV_DIR/venv/bin/python" -m pip --version >>"$LOG" 2>&1; then
  VPY="$ENV_DIR/venv/bin/python"
  # Resolve against what is installed (system site) plus the bundle; a requirement neither has
  # fails here, and then the bundle goes in without the check.
  if "$VPY" -m pip install --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt" >>"$LOG" 2>&1; then
    say "installed the bundle into a venv (--system-site-packages)"
  else
    say "pip could not resolve every dependency offline (see setup.log); installing the bundle with --no-deps"
    "$VPY" -m pip install --no-index --find-links "$WHEELS" --no-deps -r "$WHEELS/requirements.txt" >>"$LOG" 2>&1
  fi
  "$VPY" -m pip install --no-index --find-links "$WHEELS" --no-deps -r "$WHEELS/requirements-nodeps.txt" >>"$LOG" 2>&1
  RUN_PY="$VPY"
elif "$PY" -m pip --version >>"$LOG" 2>&1; then
  say "no venv with pip here; pip install --target $ENV_DIR/site"
  "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps --target "$ENV_DIR/site" \
    -r "$WHEELS/requirements.txt" -r "$WHEELS/requirements-nodeps.txt" >>"$LOG" 2>&1
  RUN_PY="$PY"
  EXTRA_PATH="$ENV_DIR/site"
else
  say "no pip here; unzipping the wheels into $ENV_DIR/site"
  "$PY" - "$WHEELS" "$ENV_DIR/site" <<'EOF' >>"$LOG" 2>&1
import pathlib, sys, zipfile
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for w in sorted(src.glob("*.whl")):
  zipfile.ZipFile(w).extractall(dst)
  print("unzipped", w.name)
EOF
  RUN_PY="$PY"
  EXTRA_PATH="$ENV_DIR/site"
fi
export PYTHONPATH="$REPO${EXTRA_PATH:+:$EXTRA_PATH}${PYTHONPATH:+:$PYTHONPATH}"

# The whole import chain of the driver, before any GPU time is spent on a broken install.
if ! "$RUN_PY" - >>"$LOG" 2>&1 <<'EOF'
import sys
import jax, flax, optax, orbax.checkpoint, grain, ml_collections, psutil
sys.path.insert(0, "benchmarks")
import gpu_bench, attention_check, ztt_jax.decoding  # the driver and what it imports lazily
print("imports ok: jax", jax.__version__, "flax", flax.__version__, "grain", grain.__version__ if hasattr(grain, "__version__") else "?")
print("devices:", jax.devices())
EOF
then
  say "import check failed:"
  tail -30 "$LOG"
  exit 3
fi
say "$(grep '^imports ok' "$LOG" | tail -1)"
say "$(grep '^devices:' "$LOG" | tail -1)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1 || true

# --------------------------------------------------------------------------- run the driver
ELAPSED=$(( $(date +%s) - T0 ))
LEFT=$(( TOTAL_S - ELAPSED ))
# The driver stops starting items at its budget; the hard timeout leaves it 30 s more to finish one.
BUDGET=$(( LEFT - 45 ))
if (( BUDGET < 30 )); then
  say "only ${LEFT}s left after setup; not starting the benchmark"
  exit 4
fi
say "running benchmarks/gpu_bench.py with --budget_s=$BUDGET"
# Let the allocator take most of the GPU (the default 75% is for sharing the chip).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
timeout --kill-after=10 $(( BUDGET + 30 )) "$RUN_PY" benchmarks/gpu_bench.py --json "$OUT_DIR/gpu_bench.json" \
  --budget_s "$BUDGET" ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT_DIR/gpu_bench.log"
RC=${PIPESTATUS[0]}
say "done in $(( $(date +%s) - T0 ))s (driver exit code $RC); results in $OUT_DIR/gpu_bench.json"
exit "$RC"

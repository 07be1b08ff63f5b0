#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a multi-host pod): create the slice if it does not
# exist, put this checkout on every worker, install requirements.txt plus jax[tpu] in a venv there,
# and run the same train command on all workers at once (`gcloud ... ssh --worker=all`). Each worker
# runs one `python -m ztt_jax.train`; ztt_jax.distributed sees the TPU VM and calls
# jax.distributed.initialize() with no arguments, which finds the other workers by itself.
#
#   TPU_NAME=ztt-v4 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 launch/tpu_pod.sh \
#       --config=configs/default.py --workdir=gs://MY_BUCKET/runs/ztt --config.train.steps=20000
#
# The workdir must be visible to every worker (a gs:// bucket, or a shared filesystem): Orbax
# writes each checkpoint once, cooperatively, into it. Re-running the same command resumes.
#
# Environment:
#   TPU_NAME, ZONE        required
#   PROJECT               default: gcloud's configured project
#   ACCELERATOR_TYPE      needed only to create the slice (v4-32, v5litepod-16, v6e-16, ...)
#   RUNTIME_VERSION       TPU VM image when creating (default tpu-ubuntu2204-base)
#   SPOT=1                create a Spot slice; a preempted one is deleted and recreated on re-run
#   CODE=copy|git         copy: this checkout's files via scp (default); git: clone GIT_URL@GIT_REF
#   REMOTE_DIR            where the code lives on the workers (default ztt_jax, under $HOME)
#   PYTHON_BIN            interpreter for the venv (default python3.11, installed with apt when
#                         missing: the pinned numpy needs Python >= 3.11, Ubuntu 22.04 ships 3.10)
#   SKIP_INSTALL=1        reuse the venv already on the workers
#   DETACH=1              start training under nohup (log: REMOTE_DIR/train.log) and return
#   GCLOUD                gcloud binary (default gcloud)
# Preemption: a maintenance event or Spot preemption sends SIGTERM; JAX's preemption service makes
# every worker stop at the same step, save a checkpoint and exit 0. Re-run this script to resume.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${TPU_NAME:?set TPU_NAME, the TPU VM name}"
: "${ZONE:?set ZONE, e.g. us-central2-b}"
GCLOUD="${GCLOUD:-gcloud}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
PYTHON_BIN="${PYTHON_BIN:-python3.11}"
CODE="${CODE:-copy}"
REMOTE_DIR="${REMOTE_DIR:-ztt_jax}"
if [ $# -eq 0 ]; then
  echo "usage: TPU_NAME=... ZONE=... [ACCELERATOR_TYPE=...] $0 --config=... --workdir=gs://... [train flags]" >&2
  exit 2
fi
for arg in "$@"; do
  case "$arg" in
    --workdir=gs://*|--workdir=/*) ;;
    --workdir=*) echo "warning: $arg is relative: each worker would write its own copy under" \
                      "~/$REMOTE_DIR; use gs://... or a shared filesystem" >&2 ;;
  esac
done

where=(--zone="$ZONE")
[ -n "${PROJECT:-}" ] && where+=(--project="$PROJECT")
tpu() { "$GCLOUD" compute tpus tpu-vm "$@"; }
on_all_workers() { tpu ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"; }

# 1. The slice.
state="$(tpu describe "$TPU_NAME" "${where[@]}" --format='value(state)' 2>/dev/null || true)"
if [ "$state" = "PREEMPTED" ] || [ "$state" = "TERMINATED" ]; then
  echo "tpu_pod.sh: $TPU_NAME is $state; deleting it to create it again" >&2
  tpu delete "$TPU_NAME" "${where[@]}" --quiet
  state=""
fi
if [ -z "$state" ]; then
  : "${ACCELERATOR_TYPE:?$TPU_NAME does not exist; set ACCELERATOR_TYPE (e.g. v4-32) to create it}"
  create=(create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR_TYPE"
          --version="$RUNTIME_VERSION")
  [ "${SPOT:-0}" = 1 ] && create+=(--spot)
  tpu "${create[@]}"
elif [ "$state" != "READY" ]; then
  echo "tpu_pod.sh: $TPU_NAME is $state, not READY; wait for it or delete it" >&2
  exit 1
fi

# 2. The code, identical on every worker.
if [ "$CODE" = git ]; then
  : "${GIT_URL:?CODE=git needs GIT_URL (and optionally GIT_REF)}"
  ref="${GIT_REF:-main}"
  on_all_workers "set -e; [ -d $REMOTE_DIR/.git ] || git clone -q $(printf %q "$GIT_URL") $REMOTE_DIR; git -C $REMOTE_DIR fetch -q origin $(printf %q "$ref"); git -C $REMOTE_DIR checkout -q --detach FETCH_HEAD"
else
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  tarball="$tmp/ztt_jax_code.tgz"
  # Tracked and new files, never .venv, runs/ or other ignored outputs.
  git ls-files -z --cached --others --exclude-standard | tar -czf "$tarball" --null -T -
  tpu scp "$tarball" "$TPU_NAME:ztt_jax_code.tgz" "${where[@]}" --worker=all
  on_all_workers "set -e; mkdir -p $REMOTE_DIR; tar -xzf ztt_jax_code.tgz -C $REMOTE_DIR; rm ztt_jax_code.tgz"
fi

# 3. The environment: the pinned requirements plus the TPU build of the same jax version.
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  jax_version="$(sed -n 's/^jax==//p' requirements.txt)"
  on_all_workers "set -e; command -v $PYTHON_BIN >/dev/null || { sudo apt-get update -qq; sudo apt-get install -y -qq $PYTHON_BIN $PYTHON_BIN-venv; }; cd $REMOTE_DIR; [ -x .venv/bin/python ] || $PYTHON_BIN -m venv .venv; .venv/bin/pip install -q --upgrade pip; .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==$jax_version'; .venv/bin/pip install -q --no-deps -e ."
fi

# 4. The same command on every worker.
train="$(printf '%q ' .venv/bin/python -m ztt_jax.train "$@")"
if [ "${DETACH:-0}" = 1 ]; then
  on_all_workers "cd $REMOTE_DIR && nohup $train > train.log 2>&1 < /dev/null &"
  echo "tpu_pod.sh: training started on every worker of $TPU_NAME; logs: ~/$REMOTE_DIR/train.log"
else
  on_all_workers "cd $REMOTE_DIR && $train"
fi

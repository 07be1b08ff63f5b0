#!/usr/bin/env bash
# Simulates N hosts on this machine: N processes of `python -m ztt_jax.train` on localhost, each with
# DEVICES_PER_PROCESS fake CPU devices, joined through jax.distributed (coordinator on 127.0.0.1).
#   launch/multiprocess.sh N DEVICES_PER_PROCESS [train flags...]
# Waits for all of them; exits non-zero if any fails (and then stops the others).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  echo "usage: $0 N DEVICES_PER_PROCESS [train flags...]" >&2; exit 2
fi
N=$1; DEVICES=$2; shift 2
PY="${PYTHON:-.venv/bin/python}"
PORT="${ZTT_COORDINATOR_PORT:-$("$PY" -c 'import portpicker; print(portpicker.pick_unused_port())')}"
LOGDIR="${ZTT_LOG_DIR:-}"

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done; }
trap 'cleanup; wait' TERM INT

for ((i = 0; i < N; i++)); do
  out=/dev/stdout; [ -n "$LOGDIR" ] && { mkdir -p "$LOGDIR"; out="$LOGDIR/process_$i.log"; }
  XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES" JAX_PLATFORMS=cpu \
    "$PY" -m ztt_jax.train --coordinator_address="127.0.0.1:$PORT" --num_processes="$N" \
      --process_id="$i" "$@" >"$out" 2>&1 &
  pids+=($!)
done

status=0
for p in "${pids[@]}"; do
  if ! wait "$p"; then
    rc=$?; [ $status -eq 0 ] && status=$rc
    echo "multiprocess.sh: process $p exited with $rc; stopping the others" >&2
    cleanup
  fi
done
exit $status

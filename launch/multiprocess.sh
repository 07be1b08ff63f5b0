#!/usr/bin/env bash
# Simulates N hosts on this machine: N processes of `python -m ztt_jax.train` on localhost, each with
# DEVICES_PER_PROCESS fake CPU devices, joined through jax.distributed (coordinator on 127.0.0.1).
#
#   launch/multiprocess.sh N DEVICES_PER_PROCESS [train flags...]
#   e.g. launch/multiprocess.sh 2 4 --config=configs/default.py --workdir=runs/mp \
#          --config.mesh.shape='(2,4,1)'
#
# Waits for all of them and exits with the first non-zero status; if one fails, the others are
# stopped (SIGTERM, then SIGKILL after ZTT_KILL_GRACE seconds, default 30) instead of waiting in a
# collective for a peer that is gone. SIGTERM/SIGINT to this script is passed on to every process
# (a simulated preemption: they save a checkpoint and exit 0).
# Environment: PYTHON (default .venv/bin/python), ZTT_COORDINATOR_PORT (default: a free port),
# ZTT_LOG_DIR (write process_<i>.log there instead of sharing this terminal).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ && "$2" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N DEVICES_PER_PROCESS [train flags...]" >&2; exit 2
fi
N=$1; DEVICES=$2; shift 2
PY="${PYTHON:-.venv/bin/python}"
PORT="${ZTT_COORDINATOR_PORT:-$("$PY" -c 'import portpicker; print(portpicker.pick_unused_port())')}"
LOGDIR="${ZTT_LOG_DIR:-}"
GRACE="${ZTT_KILL_GRACE:-30}"

pids=()
signal_all() { for p in "${pids[@]}"; do kill -"$1" "$p" 2>/dev/null; done; }
alive() { for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
stop_all() {
  signal_all TERM
  for ((t = 0; t < GRACE * 10; t++)); do alive || return 0; sleep 0.1; done
  echo "multiprocess.sh: processes still running ${GRACE}s after SIGTERM; killing them" >&2
  signal_all KILL
}
forwarded=0
trap 'forwarded=1; signal_all TERM' TERM INT

for ((i = 0; i < N; i++)); do
  out=/dev/stdout; [ -n "$LOGDIR" ] && { mkdir -p "$LOGDIR"; out="$LOGDIR/process_$i.log"; }
  XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES" JAX_PLATFORMS=cpu \
    "$PY" -m ztt_jax.train --coordinator_address="127.0.0.1:$PORT" --num_processes="$N" \
      --process_id="$i" "$@" >"$out" 2>&1 &
  pids+=($!)
done

status=0
for i in "${!pids[@]}"; do
  p=${pids[$i]}
  while true; do
    wait "$p"; rc=$?
    # A trapped signal interrupts `wait` with a status above 128 while the process still runs.
    if [ $rc -gt 128 ] && kill -0 "$p" 2>/dev/null; then continue; fi
    break
  done
  if [ $rc -ne 0 ] && [ $status -eq 0 ]; then
    status=$rc
    echo "multiprocess.sh: process $i (pid $p) exited with status $rc; stopping the others" >&2
    [ $forwarded -eq 1 ] || stop_all
  fi
done
exit $status

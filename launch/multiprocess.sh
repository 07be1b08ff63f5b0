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

if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 501)); then
  echo "multiprocess.sh needs bash >= 5.1 (wait -n -p); this is $BASH_VERSION" >&2; exit 2
fi

pids=()
killer=""
signal_all() { for p in "${pids[@]}"; do kill -"$1" "$p" 2>/dev/null; done; }
stop_all() {
  signal_all TERM
  # A process blocked in a collective for a peer that died never gets to act on SIGTERM.
  # Detached from our stdout/stderr: a caller reading them must not wait for this timer.
  ( sleep "$GRACE"; for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done ) </dev/null >/dev/null 2>&1 &
  killer=$!
}
forwarded=0
trap 'forwarded=1; signal_all TERM' TERM INT

# Each process gets its own device count; any other XLA flag of the caller's is kept.
OTHER_XLA_FLAGS=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
for ((i = 0; i < N; i++)); do
  out=/dev/stdout; [ -n "$LOGDIR" ] && { mkdir -p "$LOGDIR"; out="$LOGDIR/process_$i.log"; }
  XLA_FLAGS="$OTHER_XLA_FLAGS --xla_force_host_platform_device_count=$DEVICES" JAX_PLATFORMS=cpu \
    "$PY" -m ztt_jax.train --coordinator_address="127.0.0.1:$PORT" --num_processes="$N" \
      --process_id="$i" "$@" >"$out" 2>&1 &
  pids+=($!)
done

# Reap the processes in the order they end, so the first failure stops the rest at once.
status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  done_pid=""
  wait -n -p done_pid "${running[@]}"; rc=$?
  [ -z "${done_pid:-}" ] && continue  # a trapped signal interrupted the wait
  still=()
  for p in "${running[@]}"; do [ "$p" != "$done_pid" ] && still+=("$p"); done
  running=("${still[@]}")
  if [ $rc -ne 0 ] && [ $status -eq 0 ]; then
    status=$rc
    for i in "${!pids[@]}"; do [ "${pids[$i]}" = "$done_pid" ] && break; done
    echo "multiprocess.sh: process $i (pid $done_pid) exited with status $rc; stopping the others" >&2
    [ $forwarded -eq 1 ] || stop_all
  fi
done
[ -n "$killer" ] && kill "$killer" 2>/dev/null
exit $status

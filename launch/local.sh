#!/usr/bin/env bash
# One host, all its devices: launch/local.sh [train flags...]
# e.g. launch/local.sh --config=configs/text.py:ztt --workdir=runs/x --config.data.path=corpus.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || { make .venv/.train-deps >/dev/null && PY=.venv/bin/python; }
exec "$PY" -m ztt_jax.train "$@"

#!/usr/bin/env bash
# Downloads the wheels benchmarks/gpu.sh installs on a GPU machine that has no network.
#
#   benchmarks/gpu_wheels.sh [DIR]        # default build/gpu_wheels (ignored by git)
#
# Run it here, where PyPI is reachable. The GPU machine already has Python 3.12 with jax/jaxlib
# (+ CUDA plugin), flax, optax, orbax-checkpoint and tensorstore, and with them absl-py, etils,
# numpy, protobuf, PyYAML, msgpack, rich, psutil. What ztt_jax needs beyond that is downloaded as
# cp312 manylinux x86_64 (or pure-Python) wheels, without dependencies, at the versions of
# requirements.txt, so nothing here can replace the machine's own jax or numpy. The bundle must
# stay under 64 MiB (what a device run may carry); the script checks that.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-build/gpu_wheels}
PY=${PYTHON:-.venv/bin/python}
LIMIT_MIB=64

# name==version from requirements.txt, so the GPU run uses what the test suite passed with.
pin() { grep -iE "^$1==" requirements.txt | head -1; }

# What ztt_jax imports that the GPU image lacks, and their own missing dependencies:
#   grain (data pipeline, checkpointed iterators) <- array_record, cloudpickle, portpicker
#   ml_collections (config), tensorboardX (metrics), safetensors (export), tqdm, psutil
#   tokenizers (HF tokenizer files; installed --no-deps: huggingface-hub is only for downloads)
#   packaging (tensorboardX)
PINNED=("$(pin grain)" "$(pin array_record)" "$(pin ml_collections)" "$(pin tensorboardX)" "$(pin safetensors)")
# Common enough that the image may have them: gpu.sh asks for them unpinned, so an installed copy
# is kept and the bundle's is used only where there is none.
COMMON=("cloudpickle==3.1.3" "portpicker==1.6.0" "$(pin tqdm)" "$(pin psutil)" "packaging==26.4")
NODEPS=("$(pin tokenizers)")
PACKAGES=("${PINNED[@]}" "${COMMON[@]}" "${NODEPS[@]}")

rm -rf "$DIR"
mkdir -p "$DIR"
"$PY" -m pip download --quiet --dest "$DIR" --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any "${PACKAGES[@]}"

# What gpu.sh installs: the pinned ones as pinned, the common ones by name; tokenizers without
# its dependencies.
{ printf '%s\n' "${PINNED[@]}"; printf '%s\n' "${COMMON[@]%%==*}"; } > "$DIR/requirements.txt"
printf '%s\n' "${NODEPS[@]}" > "$DIR/requirements-nodeps.txt"

ls -l "$DIR"
size_kib=$(du -sk "$DIR" | cut -f1)
echo "wheel bundle: $((size_kib / 1024)) MiB ($size_kib KiB) in $DIR"
if (( size_kib > LIMIT_MIB * 1024 )); then
  echo "error: the bundle exceeds $LIMIT_MIB MiB" >&2
  exit 1
fi

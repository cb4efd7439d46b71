#!/usr/bin/env bash
# Fetches, here, the wheels that bench/run_gpu.sh installs on the lent GPU machine, whose image
# (Python 3.12, CUDA builds of jax and torch, no internet) lacks diffusers and ml_collections:
#   .whl/    diffusers 0.36.0 (the PyTorch reference models) and ml_collections
#   .whl31/  diffusers 0.31.0, the last release with FlaxUNet2DConditionModel (the `peer` stage)
# Both folders are kept out of git (.git/info/exclude), so name them in the device call's
# `carry` ([".whl", ".whl31"]).
#
#   bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done

download() {  # folder, requirements...
  local dir=$1
  shift
  rm -rf "$dir"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dir" "$@"
  grep -qxF "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >> .git/info/exclude
}

download .whl diffusers==0.36.0 ml_collections==1.1.0
download .whl31 diffusers==0.31.0
ls -l .whl .whl31
echo "carry: [\".whl\", \".whl31\"]; then e.g. bash bench/run_gpu.sh env mfu:400 peer"

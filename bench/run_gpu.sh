#!/usr/bin/env bash
# One lease of a GPU machine: the full-size benchmarks, each in its own process with its own
# time limit, so that one failure or overrun still leaves the others' results.
#
#   bash bench/run_gpu.sh [STAGE[:SECONDS] ...]   stages: env mfu attention unet unet_b8 sampling sampling_b2 peer
#
# Meant for the lent GPU machine, whose image has CUDA builds of jax and torch but not
# diffusers or ml_collections: those travel as wheels in .whl/ (and diffusers 0.31, the Flax
# peer, in .whl31/; `bash bench/gpu_wheels.sh` fetches both), installed with --target so the
# image's own packages stay as they are.
# Logs and the updated BENCHMARKS.md go to $OUT (default ./gpu_out). MFU_ARGS: extra flags of bench_mfu.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 HF_HUB_OFFLINE=1
# Leave room for torch in the same process (jax preallocates 75% by default).
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
PY="${PY:-python3}"

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if compgen -G ".whl31/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site31 .whl31/*.whl || exit 1
  # The peer runs its own python, with diffusers 0.31 ahead of everything else.
  printf '#!/bin/sh\nPYTHONPATH=/tmp/site31 exec %s "$@"\n' "$(command -v "$PY")" > /tmp/peer_python
  chmod +x /tmp/peer_python
fi

stage() {  # name, time limit (s), command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%T)"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name rc=$rc in $((SECONDS - t0))s"
  cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
}

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env mfu unet sampling attention)
# A stage may carry its own time limit, NAME:SECONDS (e.g. peer:150).
for spec in "${STAGES[@]}"; do
  s=${spec%%:*}
  lim=${spec#*:}
  [ "$lim" = "$spec" ] && lim=""
  case "$s" in
    env) stage env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; \
      $PY -c 'import jax, jaxlib, flax, optax, torch, diffusers, numpy; \
print(jax.__version__, jaxlib.__version__, flax.__version__, optax.__version__, torch.__version__, \
diffusers.__version__, numpy.__version__); print(jax.devices())'" ;;
    attention) stage attention 90 "$PY" -m bench.bench_attention --device gpu --warmup 3 --iters 20 ;;
    unet) stage unet 300 "$PY" -m bench.bench_unet --device gpu --warmup 3 --iters 15 --train-batch 2 ;;
    unet_b8) stage unet_b8 320 "$PY" -m bench.bench_unet --device gpu --warmup 3 --iters 15 \
      --batch 8 --train-batch 4 ;;
    sampling) stage sampling 230 "$PY" -m bench.bench_sampling --device gpu --iters 2 ;;
    sampling_b2) stage sampling_b2 250 "$PY" -m bench.bench_sampling --device gpu --iters 2 --prompts 2 ;;
    mfu) stage mfu "${lim:-450}" "$PY" -m bench.bench_mfu --device gpu --warmup 3 --iters 10 \
      --budget $(( ${lim:-450} - 30 )) --profile-dir /tmp/mfu_prof --artifacts "$OUT/mfu_traces.tar.gz" \
      --json "$OUT/mfu.json" ${MFU_ARGS:-} ;;
    peer) stage peer "${lim:-240}" "$PY" -m bench.bench_flax_peer --device gpu --warmup 3 --iters 15 \
      --peer-python /tmp/peer_python ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done

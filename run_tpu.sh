#!/usr/bin/env bash
# Create (or reuse) a Cloud TPU VM / pod slice, copy this repository to every worker,
# install jax[tpu] and the requirements, and run the same training command on all workers.
#
# Usage:
#   ./run_tpu.sh [flags] [-- command ...]
#
# Flags:
#   --name=NAME           TPU VM name (default: vidrd-<accelerator>)
#   --zone=ZONE           e.g. us-central2-b (v4), us-west4-a (v5e)          (required)
#   --accelerator=TYPE    e.g. v4-32, v5litepod-16                           (default: v4-32)
#   --project=PROJECT     GCP project (default: gcloud's configured project)
#   --bucket=gs://BUCKET  where the default command writes its workdir
#   --version=RUNTIME     TPU VM software version (default: tpu-ubuntu2204-base;
#                         v5e: v2-alpha-tpuv5-lite)
#   --config=FILE         training config for the default command (default: configs/tpu_v4.py)
#   --spot                create a spot (preemptible) slice; training resumes from the
#                         workdir's checkpoints when relaunched
#   --skip-create         do not create the VM (it must exist)
#   --skip-install        do not (re)install packages
#   --background          start the command with nohup on every worker and return
#   --dry-run             print the gcloud commands instead of running them
#   -h, --help            this help
#
# Everything after "--" is the command run in the repository folder on every worker; the
# default is:
#   python -m vidrd_jax.train --config=<config> --workdir=<bucket>/runs/<name> --config.distributed=True
#
# Examples:
#   ./run_tpu.sh --zone=us-central2-b --accelerator=v4-32 --bucket=gs://my-bucket --dry-run
#   ./run_tpu.sh --zone=us-central2-b --bucket=gs://my-bucket -- \
#     python -m vidrd_jax.train --config=configs/tpu_v4.py --workdir=gs://my-bucket/runs/a \
#     --config.init_from=gs://my-bucket/sd21_vidrd_converted --config.distributed=True
set -euo pipefail

NAME=""
ZONE=""
ACCELERATOR="v4-32"
PROJECT=""
BUCKET=""
VERSION="tpu-ubuntu2204-base"
CONFIG="configs/tpu_v4.py"
SPOT=0
SKIP_CREATE=0
SKIP_INSTALL=0
BACKGROUND=0
DRY_RUN=0
JAX_VERSION="0.10.2"
REMOTE_DIR="vidrd-jax"
COMMAND=()

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

die() {
  echo "run_tpu.sh: $*" >&2
  exit 2
}

while (($#)); do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCELERATOR="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --bucket=*) BUCKET="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --skip-create) SKIP_CREATE=1 ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --background) BACKGROUND=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      COMMAND=("$@")
      break
      ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

[[ -n "$ZONE" ]] || die "--zone is required (e.g. --zone=us-central2-b)"
[[ "$ACCELERATOR" =~ ^v[0-9a-z]+-[0-9]+$ ]] || die "--accelerator '$ACCELERATOR' does not look like v4-32 / v5litepod-16"
[[ -z "$BUCKET" || "$BUCKET" == gs://* ]] || die "--bucket must start with gs:// (got '$BUCKET')"
NAME="${NAME:-vidrd-${ACCELERATOR}}"

if ((${#COMMAND[@]} == 0)); then
  [[ -n "$BUCKET" ]] || die "--bucket is required for the default command (or pass a command after --)"
  COMMAND=(python -m vidrd_jax.train "--config=${CONFIG}" "--workdir=${BUCKET%/}/runs/${NAME}"
    --config.distributed=True)
fi

GCLOUD_COMMON=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then
  GCLOUD_COMMON+=(--project="$PROJECT")
fi

# Runs a command, or prints it (shell-quoted, so it can be pasted) with --dry-run.
run() {
  if ((DRY_RUN)); then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# 1. Create the slice unless it exists.
if ((!SKIP_CREATE)); then
  if ((!DRY_RUN)) && gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_COMMON[@]}" >/dev/null 2>&1; then
    echo "reusing TPU VM $NAME" >&2
  else
    CREATE=(gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_COMMON[@]}"
      --accelerator-type="$ACCELERATOR" --version="$VERSION")
    if ((SPOT)); then
      CREATE+=(--spot)
    fi
    run "${CREATE[@]}"
  fi
fi

# 2. Copy the code: the files git tracks (no venv, no workdirs), as one tarball.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TARBALL="${TMPDIR:-/tmp}/vidrd-jax-${NAME}.tar.gz"
run git -C "$REPO_ROOT" archive --format=tar.gz -o "$TARBALL" HEAD
run gcloud compute tpus tpu-vm scp "$TARBALL" "${NAME}:~/vidrd-jax.tar.gz" --worker=all "${GCLOUD_COMMON[@]}"
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${GCLOUD_COMMON[@]}" \
  --command="rm -rf ~/${REMOTE_DIR} && mkdir -p ~/${REMOTE_DIR} && tar -xzf ~/vidrd-jax.tar.gz -C ~/${REMOTE_DIR}"

# 3. Install jax[tpu] (matching the pinned jax) and the runtime requirements.
if ((!SKIP_INSTALL)); then
  INSTALL="cd ~/${REMOTE_DIR} && python3 -m pip install -q -U pip"
  INSTALL+=" && python3 -m pip install -q 'jax[tpu]==${JAX_VERSION}'"
  INSTALL+=" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
  INSTALL+=" && python3 -m pip install -q -r requirements.txt"
  INSTALL+=" && python3 -m pip install -q --no-deps open_clip_torch==3.3.0"
  run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${GCLOUD_COMMON[@]}" --command="$INSTALL"
fi

# 4. Launch the same command on every worker (jax.distributed.initialize() finds its peers).
# TPU VM images have python3 but no "python".
if [[ "${COMMAND[0]}" == python ]]; then
  COMMAND[0]=python3
fi
REMOTE_CMD="$(printf '%q ' "${COMMAND[@]}")"
REMOTE_CMD="${REMOTE_CMD% }"
if ((BACKGROUND)); then
  LAUNCH="cd ~/${REMOTE_DIR} && nohup ${REMOTE_CMD} > train.log 2>&1 &"
else
  LAUNCH="cd ~/${REMOTE_DIR} && ${REMOTE_CMD}"
fi
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${GCLOUD_COMMON[@]}" --command="$LAUNCH"

#!/usr/bin/env bash
# Run a qwenimage-jax command on every worker of a Cloud TPU VM slice.
#   launch/tpu_pod.sh setup                      # clone/copy the repo and install it with jax[tpu]
#   launch/tpu_pod.sh run <command> [args...]    # e.g. run train-dit --config configs/dit_7b_train.py --workdir gs://...
#   launch/tpu_pod.sh --dry-run [--topology v5p-512] run <command> [args...]
#       touches no pod: prints what would run on the workers, then compiles the command's step for the slice on
#       this host (`qwenimage-jax aot`, needs libtpu: pip install -e '.[aot]') and exits non-zero when it does not
#       fit. The topology comes from --topology or $ACCELERATOR_TYPE (the slice's type, e.g. v5p-512, v6e-256).
set -euo pipefail
DRY_RUN=0
TOPOLOGY=${ACCELERATOR_TYPE:-}
while [[ "${1:-}" == --* ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --topology) TOPOLOGY="$2"; shift 2 ;;
    --topology=*) TOPOLOGY="${1#--topology=}"; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
REPO_DIR=${REPO_DIR:-~/qwenimage-jax}
HERE="$(cd "$(dirname "$0")/.." && pwd)"

if [[ $DRY_RUN == 1 ]]; then
  [[ "${1:-}" == run ]] || { echo "--dry-run checks a 'run <command> ...' line" >&2; exit 2; }
  shift
  : "${TOPOLOGY:?--dry-run needs --topology NAME or ACCELERATOR_TYPE (e.g. v5p-512)}"
  cmd="$1"; shift
  echo "would run on every worker of ${TPU_NAME:-<TPU_NAME>} (${TOPOLOGY}):"
  echo "  cd $REPO_DIR && QIJ_DISTRIBUTED=auto nohup .venv/bin/qwenimage-jax $cmd $* > run.log 2>&1 &"
  case "$cmd" in
    train-dit|distill|train-vae) ;;
    *) echo "no ahead-of-time check for '$cmd' (train-dit, distill and train-vae have one)"; exit 0 ;;
  esac
  aot_args=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --config) aot_args+=(--config "$2"); shift 2 ;;
      --config=*|--config.*) aot_args+=("$1"); shift ;;
      --workdir) shift 2 ;;
      *) shift ;;
    esac
  done
  echo "ahead-of-time compile for $TOPOLOGY on this host:"
  PY="$HERE/.venv/bin/python"; [[ -x "$PY" ]] || PY=python3
  exec "$PY" -m qwenimage_jax.cli aot "${aot_args[@]}" --topology "$TOPOLOGY" ${AOT_ARGS:-}
fi

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"; }

case "${1:-}" in
  setup)
    gcloud compute tpus tpu-vm scp --recurse "$(git rev-parse --show-toplevel)" "$TPU_NAME":"$REPO_DIR" \
      --zone="$ZONE" $PROJECT_FLAG --worker=all
    ssh_all "cd $REPO_DIR && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
    ;;
  run)
    shift
    ssh_all "cd $REPO_DIR && QIJ_DISTRIBUTED=auto nohup .venv/bin/qwenimage-jax $* > run.log 2>&1 &"
    echo "started on all workers; logs: $REPO_DIR/run.log on each worker"
    ;;
  *) echo "usage: $0 [--dry-run [--topology NAME]] setup | run <command> [args...]" >&2; exit 2 ;;
esac

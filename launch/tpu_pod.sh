#!/usr/bin/env bash
# Run a qwenimage-jax command on every worker of a Cloud TPU VM slice.
#   launch/tpu_pod.sh setup                      # clone/copy the repo and install it with jax[tpu]
#   launch/tpu_pod.sh run <command> [args...]    # e.g. run train-dit --config configs/dit_7b_train.py --workdir gs://...
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO_DIR=${REPO_DIR:-~/qwenimage-jax}
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
  *) echo "usage: $0 setup | run <command> [args...]" >&2; exit 2 ;;
esac

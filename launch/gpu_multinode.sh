#!/usr/bin/env bash
# One process per node, all local GPUs per process. Run on every node with its NODE_RANK.
#   NODE_RANK=0 NUM_NODES=2 COORDINATOR=node0:12345 launch/gpu_multinode.sh train-dit --config ... --workdir /shared/x
set -euo pipefail
: "${NODE_RANK:?set NODE_RANK}" "${NUM_NODES:?set NUM_NODES}" "${COORDINATOR:?set COORDINATOR host:port}"
export QIJ_COORDINATOR="$COORDINATOR" QIJ_NUM_PROCESSES="$NUM_NODES" QIJ_PROCESS_ID="$NODE_RANK"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec "$(dirname "$0")/../.venv/bin/qwenimage-jax" "$@"

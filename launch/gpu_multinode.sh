#!/usr/bin/env bash
# One process per node, all local GPUs per process. Run on every node with its NODE_RANK.
#   NODE_RANK=0 NUM_NODES=2 COORDINATOR=node0:12345 launch/gpu_multinode.sh train-dit --config ... --workdir /shared/x
#   NUM_NODES=4 COORDINATOR=node0:12345 launch/gpu_multinode.sh --dry-run train-dit --config ... --workdir /shared/x
#       prints the exact command and environment of every node (NODE_RANK 0..NUM_NODES-1) and runs nothing.
set -euo pipefail
DRY_RUN=0
if [[ "${1:-}" == --dry-run ]]; then DRY_RUN=1; shift; fi
: "${NUM_NODES:?set NUM_NODES}" "${COORDINATOR:?set COORDINATOR host:port}"
MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
BIN="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/qwenimage-jax"

if [[ $DRY_RUN == 1 ]]; then
  echo "# $NUM_NODES nodes, coordinator $COORDINATOR (node 0); one process per node over all its GPUs"
  for ((i = 0; i < NUM_NODES; i++)); do
    printf 'node %d: QIJ_COORDINATOR=%q QIJ_NUM_PROCESSES=%q QIJ_PROCESS_ID=%d XLA_PYTHON_CLIENT_MEM_FRACTION=%q %q' \
      "$i" "$COORDINATOR" "$NUM_NODES" "$i" "$MEM_FRACTION" "$BIN"
    printf ' %q' "$@"
    printf '\n'
  done
  exit 0
fi

: "${NODE_RANK:?set NODE_RANK}"
export QIJ_COORDINATOR="$COORDINATOR" QIJ_NUM_PROCESSES="$NUM_NODES" QIJ_PROCESS_ID="$NODE_RANK"
export XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION"
exec "$BIN" "$@"

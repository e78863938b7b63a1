#!/usr/bin/env bash
# Multi-node training with torchrun (PyTorch DDP: NCCL on GPUs, Gloo on CPU).
#
# Run this same script on every node, with the same MASTER_ADDR (node 0's address) and
# NODE_RANK set per node (0..NNODES-1). The run folder (--out) must be on a file system
# every node sees: rank 0 writes checkpoints and the bundle, every rank reads the
# checkpoint it resumes from. One MLflow run is written by rank 0, so point all nodes
# at a shared tracking server:   export MLFLOW_TRACKING_URI=http://mlflow.internal:5000
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 workflows/torchrun_multinode.sh data/Task09_Spleen runs/spleen
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 workflows/torchrun_multinode.sh data/Task09_Spleen runs/spleen
#
# It resumes by itself (--resume auto), so the same command restarts a pre-empted job.
set -euo pipefail

DATA=${1:?usage: torchrun_multinode.sh DATASET RUN_DIR [extra medseg train args]}
OUT=${2:?usage: torchrun_multinode.sh DATASET RUN_DIR [extra medseg train args]}
shift 2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${CONFIG:-workflows/spleen_ct.yaml}

exec torchrun \
  --nnodes "$NNODES" \
  --node_rank "$NODE_RANK" \
  --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" \
  -m medseg train --data "$DATA" --config "$CONFIG" --out "$OUT" --resume auto "$@"

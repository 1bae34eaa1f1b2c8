#!/usr/bin/env bash
# vugen fit on N nodes x G GPUs with torchrun (c10d rendezvous), FSDP2 and bf16-mixed. Run the same command on
# every node; torchrun starts G processes per node and Lightning reads their ranks from torchrun's environment.
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29500 CONFIG=my-decoder.yaml examples/multinode/torchrun.sh
# Arguments are passed on to `vugen fit` (e.g. --trainer.max_steps 100000).
set -euo pipefail

: "${CONFIG:?set CONFIG to the stage config, e.g. CONFIG=configs/demo/decoder.yaml}"
STRATEGY_CONFIG="${STRATEGY_CONFIG:-configs/trainer/fsdp.yaml}"
NNODES="${NNODES:-1}"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-localhost:29500}"
RDZV_ID="${RDZV_ID:-vugen}"

# FSDP2 shards over every GPU: the data-parallel mesh is the whole world (ddp.yaml has no such setting).
EXTRA=()  # expanded below as ${EXTRA[@]+...}: bash < 4.4 treats an empty array as unset under set -u
if grep -q ModelParallelStrategy "$STRATEGY_CONFIG"; then
  EXTRA+=(--trainer.strategy.init_args.data_parallel_size "$((NNODES * NPROC_PER_NODE))")
fi

exec torchrun \
  --nnodes "$NNODES" \
  --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d \
  --rdzv-endpoint "$RDZV_ENDPOINT" \
  --rdzv-id "$RDZV_ID" \
  -m vugen.cli fit \
  --config "$CONFIG" \
  --config "$STRATEGY_CONFIG" \
  --trainer.num_nodes "$NNODES" \
  --trainer.devices "$NPROC_PER_NODE" \
  ${EXTRA[@]+"${EXTRA[@]}"} \
  "$@"

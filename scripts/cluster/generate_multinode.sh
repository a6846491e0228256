#!/bin/bash
# One store written by every GPU of several nodes through `accelerate launch` (a shared file system; the images do
# not depend on the process count). Run inside an allocation, e.g. `salloc --nodes=2 --gpus-per-node=8`:
#
#   srun --nodes=2 --ntasks-per-node=1 bash scripts/cluster/generate_multinode.sh gen.yaml runs/gen 8
#
# Add `--shard auto` to the longtail line to make every process (torchrun's RANK / WORLD_SIZE) its own shard with no
# barrier: when the launcher stops all processes after one fails, the finished shards are kept and
# `longtail merge runs/gen` names the rest.
set -euo pipefail
config=${1:?usage: generate_multinode.sh CONFIG.yaml OUT GPUS_PER_NODE}
out=${2:?usage: generate_multinode.sh CONFIG.yaml OUT GPUS_PER_NODE}
gpus=${3:?usage: generate_multinode.sh CONFIG.yaml OUT GPUS_PER_NODE}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
accelerate launch --multi_gpu --num_machines "$SLURM_NNODES" --num_processes $((SLURM_NNODES * gpus)) \
  --machine_rank "$SLURM_NODEID" --main_process_ip "$head_node" --main_process_port 29500 \
  --mixed_precision no --dynamo_backend no \
  -m longtail generate --config "$config" --out "$out" --no-progress

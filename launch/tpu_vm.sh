#!/usr/bin/env bash
# TPU VM / pod slice: run the same command on every worker.
#   bash launch/tpu_vm.sh my-tpu us-central2-b configs/tokenizer.py:seed1,tpu_v4_32 /mnt/shared/seed1
# The workdir must be a filesystem path every worker sees (e.g. a Filestore / NFS mount).
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; config=${3:?config}; workdir=${4:?workdir on shared storage}
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ~/seed_jax && pip install -e . && pip install 'jax[tpu]' &&
  python -m seed_jax.main --config=$config --workdir=$workdir --distributed"

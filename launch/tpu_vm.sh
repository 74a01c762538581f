#!/usr/bin/env bash
# TPU VM / pod slice: run the same command on every worker, one ssh per worker.
#   bash launch/tpu_vm.sh my-tpu us-central2-b configs/tokenizer.py:seed1,tpu_v4_32 /mnt/shared/seed1 [flags...]
# Flags after the workdir (e.g. --config.data.train_dir=/mnt/data) go to every worker's training.
# The workdir must be a filesystem path every worker sees (e.g. a Filestore / NFS mount).
# Each worker runs the repository at ~/seed_jax (there, it installs it and jax[tpu]): copy or
# clone it there on every worker first (e.g. `gcloud compute tpus tpu-vm scp --recurse --worker=all`).
# The worker count is the number of the TPU's network endpoints (one per worker, from
# `gcloud compute tpus tpu-vm describe`); WORKERS=N sets it instead.
# When one worker fails, the training on the others is killed at once: it would otherwise
# wait in its next collective until JAX's coordination timeout (minutes). It is killed on
# the workers (ending a local ssh client need not end its remote command), with SIGKILL
# (training takes SIGTERM as a preemption, to agree on in a collective). The script exits
# with the failed worker's status.
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; config=${3:?config}; workdir=${4:?workdir on shared storage}

# Called directly, not through a function: a background job's id is then the ssh client's.
tpu_ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone")

# The number of workers: `value(...)` prints the endpoints' addresses separated by ';'.
count_workers() {
  gcloud compute tpus tpu-vm describe "$tpu" --zone="$zone" --format='value(networkEndpoints[].ipAddress)' |
    awk -F';' '{ n += NF } END { print n + 0 }'
}

# The pattern matches the training's command line but not this one's ('[.]' is not '.').
stop_on_workers() { "${tpu_ssh[@]}" --worker=all --command="pkill -KILL -f 'seed_jax[.]main' || true" || true; }

workers=${WORKERS:-$(count_workers)}
[[ $workers =~ ^[1-9][0-9]*$ ]] || { echo "expected a positive worker count (WORKERS or the TPU's networkEndpoints), got '$workers'" >&2; exit 2; }
# The worker's shell parses the command: config, workdir and flags quoted for it (%q), so
# that each arrives as one argument, whatever spaces or parentheses it holds.
printf -v train "cd ~/seed_jax && pip install -e . && pip install 'jax[tpu]' &&
  python -m seed_jax.main --config=%q --workdir=%q --distributed" "$config" "$workdir"
if [[ $# -gt 4 ]]; then printf -v flags ' %q' "${@:5}" && train+=$flags; fi
trap 'running=$(jobs -rp); [ -z "$running" ] || kill -KILL $running 2>/dev/null || true' EXIT
for ((i = 0; i < workers; i++)); do
  "${tpu_ssh[@]}" --worker="$i" --command="$train" &
done
for ((left = workers; left > 0; left--)); do
  wait -n || { status=$?; echo "a worker exited with status $status: stopping the others" >&2; stop_on_workers; exit "$status"; }
done

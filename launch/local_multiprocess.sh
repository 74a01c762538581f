#!/usr/bin/env bash
# Two (or N) JAX processes on this machine talking over loopback, each with 4 fake CPU
# devices (on the CPU, where there are GPUs too): exercises the multi-host code path
# (per-process data slices, global arrays).
#   bash launch/local_multiprocess.sh [N] [extra flags...]
# The flags go to every process after the script's own (--config=configs/tokenizer.py:tiny: a
# --config among them replaces it). PORT sets the coordinator's port (default 12355), WORKDIR
# the run's workdir (default workdirs/tokenizer_multiprocess, which a rerun resumes).
# When one process fails, the others are killed at once: they would otherwise wait in
# their next collective until JAX's coordination timeout (minutes). The script exits
# with the failed process's status. Only processes still running are signalled: the
# ids of those already waited for may belong to other processes by then.
# An XLA_FLAGS of the caller's (e.g. --xla_dump_to) is kept, with the 4 devices added;
# where it sets --xla_force_host_platform_device_count itself, that count is each process's.
set -euo pipefail
n=2
if [[ $# -gt 0 && $1 != -* ]]; then  # a process count first, else flags alone
  [[ $1 =~ ^[1-9][0-9]*$ ]] || { echo "expected a process count N >= 1 before the flags, got '$1'" >&2; exit 2; }
  n=$1; shift
fi
port=${PORT:-12355}
workdir=${WORKDIR:-workdirs/tokenizer_multiprocess}
xla_flags=${XLA_FLAGS:-}
[[ " $xla_flags" =~ [[:space:]]--?xla_force_host_platform_device_count= ]] ||
  xla_flags="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=4"
trap 'running=$(jobs -rp); [ -z "$running" ] || kill -KILL $running 2>/dev/null || true' EXIT
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS=$xla_flags python -m seed_jax.main \
    --config=configs/tokenizer.py:tiny --workdir="$workdir" --distributed \
    --coordinator_address=127.0.0.1:$port --num_processes="$n" --process_id=$i "$@" &
done
for ((left = n; left > 0; left--)); do
  wait -n || { status=$?; echo "a process exited with status $status: stopping the others" >&2; exit "$status"; }
done

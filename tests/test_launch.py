"""The launch scripts with stand-ins on PATH: launch/local_multiprocess.sh with a
`python`, launch/tpu_vm.sh with a `gcloud` simulating the workers. When one process
(worker) fails, the others are killed at once and the script exits with its status
(they used to wait in their next collective until JAX's coordination timeout)."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

LAUNCH = os.path.join(os.path.dirname(__file__), "..", "launch")
SCRIPT = os.path.join(LAUNCH, "local_multiprocess.sh")

# Records its pid (and with $ENVS its JAX_PLATFORMS and XLA_FLAGS), then exits a second later
# with the status EXIT_<process id> gives (so that the others have started), or without one
# waits ten minutes.
STAND_IN = """#!/usr/bin/env bash
for arg in "$@"; do
  case $arg in --process_id=*) id=${arg#--process_id=} ;; esac
done
echo $$ > "$PIDS/$id"
[ -z "${ENVS:-}" ] || echo "${JAX_PLATFORMS-unset} ${XLA_FLAGS-unset}" > "$ENVS/$id"
status_var=EXIT_$id
if [ -n "${!status_var:-}" ]; then sleep 1; exit "${!status_var}"; fi
exec sleep 600
"""


# Sourced by every bash the test starts (BASH_ENV): `kill` also writes its arguments to $KILL_LOG.
LOGGED_KILL = 'kill() { echo "$*" >> "$KILL_LOG"; builtin kill "$@"; }\n'


def _launch(tmp_path, n: int | str | None, *flags: str, **exit_statuses) -> tuple[subprocess.CompletedProcess, float]:
    """Runs the script with `n` (None: none given) and `flags`; (its result, seconds)."""
    bin_dir, pids = tmp_path / "bin", tmp_path / "pids"
    bin_dir.mkdir()
    pids.mkdir()
    (bin_dir / "python").write_text(STAND_IN)
    (bin_dir / "python").chmod(0o755)
    (tmp_path / "logged_kill.sh").write_text(LOGGED_KILL)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PIDS": str(pids), **exit_statuses,
           "BASH_ENV": str(tmp_path / "logged_kill.sh"), "KILL_LOG": str(tmp_path / "kill.log")}
    start = time.perf_counter()
    count = [] if n is None else [str(n)]
    done = subprocess.run(["bash", SCRIPT, *count, *flags], env=env, capture_output=True, text=True, timeout=60)
    return done, time.perf_counter() - start


def _signalled(tmp_path) -> set[int]:
    """The process ids the script passed to `kill`."""
    log = tmp_path / "kill.log"
    return {int(word) for word in log.read_text().split() if word.isdigit()} if log.exists() else set()


def _running(pid: int) -> bool:
    """Whether `pid` runs (a killed process this container's init has not reaped yet is a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_one_failed_process_stops_the_others(tmp_path):
    done, seconds = _launch(tmp_path, 3, EXIT_1="3")
    assert done.returncode == 3, done.stderr
    assert "a process exited with status 3: stopping the others" in done.stderr
    assert seconds < 60  # the others' stand-ins wait 600 s
    waiting = [int((tmp_path / "pids" / str(i)).read_text()) for i in (0, 2)]
    time.sleep(0.5)
    assert not any(_running(pid) for pid in waiting)
    # the failed process was waited for: its id may be another process's by now
    assert _signalled(tmp_path) == set(waiting)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_processes_that_all_succeed_exit_0(tmp_path):
    done, _ = _launch(tmp_path, 2, EXIT_0="0", EXIT_1="0")
    assert done.returncode == 0, done.stderr
    assert not _signalled(tmp_path)  # every process was waited for: their ids may be others' by now


def test_flags_without_a_process_count_start_two_processes(tmp_path):
    """Flags given first were read as the process count: bash failed on the arithmetic."""
    done, _ = _launch(tmp_path, None, "--config.stage1.num_steps=5", EXIT_0="0", EXIT_1="0")
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path / "pids")) == ["0", "1"]


def test_processes_get_fake_cpu_devices_even_where_jax_would_take_gpus(tmp_path, monkeypatch):
    """Without JAX_PLATFORMS=cpu, JAX on a machine with GPUs (jax[cuda]) gave every process
    all of its GPUs, not the 4 fake CPU devices: the processes shared them."""
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)  # JAX's default: a GPU where there is one
    (tmp_path / "envs").mkdir()
    done, _ = _launch(tmp_path, 2, EXIT_0="0", EXIT_1="0", ENVS=str(tmp_path / "envs"))
    assert done.returncode == 0, done.stderr
    for i in "01":
        platforms, *xla_flags = (tmp_path / "envs" / i).read_text().split()
        assert platforms == "cpu" and "--xla_force_host_platform_device_count=4" in xla_flags


@pytest.mark.parametrize("callers, count", [("--xla_dump_to=/tmp/dump", "4"),
                                             ("--xla_dump_to=/tmp/dump --xla_force_host_platform_device_count=8", "8")])
def test_processes_keep_the_callers_xla_flags(tmp_path, monkeypatch, callers, count):
    """XLA_FLAGS was replaced by the device count: a caller's --xla_dump_to was dropped.
    A device count of the caller's is each process's."""
    monkeypatch.setenv("XLA_FLAGS", callers)
    (tmp_path / "envs").mkdir()
    done, _ = _launch(tmp_path, 2, EXIT_0="0", EXIT_1="0", ENVS=str(tmp_path / "envs"))
    assert done.returncode == 0, done.stderr
    for i in "01":
        _, *xla_flags = (tmp_path / "envs" / i).read_text().split()
        assert "--xla_dump_to=/tmp/dump" in xla_flags
        assert [flag for flag in xla_flags if "device_count" in flag] == [f"--xla_force_host_platform_device_count={count}"]


def test_a_first_argument_neither_a_count_nor_a_flag_is_named(tmp_path):
    done, _ = _launch(tmp_path, "two")
    assert done.returncode == 2
    assert "expected a process count N >= 1 before the flags, got 'two'" in done.stderr


# Writes its arguments (NUL-separated) to a file of its own under $CALLS, then simulates:
# `describe` prints $ENDPOINTS; `ssh --worker=I` runs worker I's training, which exits with
# EXIT_I once the trainings of the workers in $WAITING run, or, without EXIT_I, is a
# process on the "worker" (its pid in $PIDS/remote-I) that runs ten minutes, ignores
# SIGTERM as the real training does, and has the command as its command line;
# `ssh --worker=all` runs a `pkill` command restricted to the test's session.
GCLOUD_STAND_IN = r"""#!/usr/bin/env bash
printf '%s\0' "$@" > "$CALLS/$(date +%s%N).$$"
for arg in "$@"; do
  case $arg in --worker=*) worker=${arg#--worker=} ;; --command=*) command=${arg#--command=} ;; esac
done
case $4 in
  describe) echo "$ENDPOINTS" ;;
  ssh)
    if [ "$worker" = all ]; then
      [[ $command == "pkill "* ]] || { echo "stand-in gcloud: unexpected command on all workers" >&2; exit 99; }
      exec bash -c "pkill() { command pkill --session 0 \"\$@\"; }; $command"
    fi
    status_var=EXIT_$worker
    if [ -n "${!status_var:-}" ]; then
      for other in $WAITING; do until [ -s "$PIDS/remote-$other" ]; do sleep 0.1; done; done
      exit "${!status_var}"
    fi
    (trap '' TERM; exec -a "$command" sleep 600) &
    echo $! > "$PIDS/remote-$worker.tmp" && mv "$PIDS/remote-$worker.tmp" "$PIDS/remote-$worker"
    wait $! ;;
  *) echo "stand-in gcloud: unexpected verb $4" >&2; exit 99 ;;
esac
"""

TPU_ARGS = ["my-tpu", "zone-b", "configs/tokenizer.py:seed1,tpu_v4_32", "/mnt/shared/run"]


def _training_argv(tpu_args: list[str]) -> list[str]:
    """The arguments the training's `python` gets for tpu_vm.sh's `tpu_args`."""
    return ["-m", "seed_jax.main", f"--config={tpu_args[2]}", f"--workdir={tpu_args[3]}", "--distributed",
            *tpu_args[4:]]


# A worker's stand-ins: `pip` does nothing, `python` writes its arguments (NUL-separated) to $ARGV.
WORKER_PIP, WORKER_PYTHON = "#!/usr/bin/env bash\n", '#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$ARGV"\n'


def _python_argv_on_a_worker(command: str, tmp_path) -> list[str]:
    """The arguments `python` gets when a worker's shell runs `command` (with ~/seed_jax
    a folder under `tmp_path`, `pip` and `python` stand-ins)."""
    home, bin_dir, argv = tmp_path / "worker_home", tmp_path / "worker_bin", tmp_path / "worker_argv"
    (home / "seed_jax").mkdir(parents=True, exist_ok=True)
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("pip", WORKER_PIP), ("python", WORKER_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}", "ARGV": str(argv)}
    done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return argv.read_text().rstrip("\0").split("\0")


def _launch_tpu(tmp_path, tpu_args=TPU_ARGS, **env_vars) -> tuple[subprocess.CompletedProcess, float, list[list[str]]]:
    """Runs tpu_vm.sh with `tpu_args` in a session of its own (killed whole if it outlives 60 s).
    Returns its result, its seconds and the stand-in gcloud's calls (argument lists) in order."""
    bin_dir, calls, pids = tmp_path / "bin", tmp_path / "calls", tmp_path / "pids"
    for folder in (bin_dir, calls, pids):
        folder.mkdir()
    (bin_dir / "gcloud").write_text(GCLOUD_STAND_IN)
    (bin_dir / "gcloud").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "PIDS": str(pids),
           **env_vars}
    start = time.perf_counter()
    process = subprocess.Popen(["bash", os.path.join(LAUNCH, "tpu_vm.sh"), *tpu_args], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("tpu_vm.sh still ran after 60 s (the waiting workers' trainings run 600 s)")
    seconds = time.perf_counter() - start
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    ordered = sorted(calls.iterdir(), key=lambda f: int(f.name.split(".")[0]))
    return done, seconds, [f.read_text().rstrip("\0").split("\0") for f in ordered]


def _worker_calls(calls: list[list[str]]) -> dict[str, str]:
    """The command each `ssh --worker=W` call ran, by W."""
    ssh = [dict(arg[2:].split("=", 1) for arg in call[5:]) for call in calls if call[3] == "ssh"]
    return {options["worker"]: options["command"] for options in ssh}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_tpu_vm_one_failed_worker_stops_the_others_on_the_workers(tmp_path):
    done, seconds, calls = _launch_tpu(tmp_path, ENDPOINTS="10.0.0.2;10.0.0.3;10.0.0.4", EXIT_1="3", WAITING="0 2")
    assert done.returncode == 3, done.stderr
    assert "a worker exited with status 3: stopping the others" in done.stderr
    assert seconds < 60  # the others' trainings run 600 s
    assert all(call[4:6] == ["my-tpu", "--zone=zone-b"] for call in calls)
    assert calls[0][3] == "describe" and "networkEndpoints" in calls[0][-1]
    commands = _worker_calls(calls)
    assert set(commands) == {"0", "1", "2", "all"}  # one ssh per worker, then the stop on all
    for worker in "012":
        assert "pip install -e ." in commands[worker]
        assert _python_argv_on_a_worker(commands[worker], tmp_path) == _training_argv(TPU_ARGS)
    remote = [int((tmp_path / "pids" / f"remote-{i}").read_text()) for i in (0, 2)]
    time.sleep(0.5)
    assert not any(_running(pid) for pid in remote)  # stopped on the "workers", despite ignoring SIGTERM


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_tpu_vm_workers_that_all_succeed_exit_0(tmp_path):
    done, _, calls = _launch_tpu(tmp_path, WORKERS="2", EXIT_0="0", EXIT_1="0", WAITING="")
    assert done.returncode == 0, done.stderr
    assert [call[3] for call in calls] == ["ssh", "ssh"]  # WORKERS set: no describe; no stop
    assert set(_worker_calls(calls)) == {"0", "1"}


def test_tpu_vm_workers_get_the_config_and_workdir_as_given(tmp_path):
    """They went into the workers' command unquoted: a workdir with a space or a
    parenthesis split into several arguments, or did not parse at all."""
    tpu_args = [*TPU_ARGS[:3], "/mnt/shared/seed1 (run 2)"]
    done, _, calls = _launch_tpu(tmp_path, tpu_args, WORKERS="1", EXIT_0="0", WAITING="")
    assert done.returncode == 0, done.stderr
    assert _python_argv_on_a_worker(_worker_calls(calls)["0"], tmp_path) == _training_argv(tpu_args)


def test_tpu_vm_workers_get_the_flags_after_the_workdir(tmp_path):
    """Arguments after the workdir were dropped: a run given --config.data.train_dir=...
    trained on the preset's data instead, without a word."""
    tpu_args = [*TPU_ARGS, "--config.data.train_dir=/mnt/data (v2)", '--config.data.crop_scale=(0.8, 1.0)']
    done, _, calls = _launch_tpu(tmp_path, tpu_args, WORKERS="2", EXIT_0="0", EXIT_1="0", WAITING="")
    assert done.returncode == 0, done.stderr
    for worker in "01":
        assert _python_argv_on_a_worker(_worker_calls(calls)[worker], tmp_path) == _training_argv(tpu_args)


def test_tpu_vm_without_endpoints_names_the_worker_count(tmp_path):
    done, _, calls = _launch_tpu(tmp_path, ENDPOINTS="", WAITING="")
    assert done.returncode == 2
    assert "expected a positive worker count (WORKERS or the TPU's networkEndpoints), got '0'" in done.stderr
    assert [call[3] for call in calls] == ["describe"]


# Records srun's arguments (NUL-separated) and the JAX_LOCAL_DEVICE_IDS its tasks would
# get, then exits with $SRUN_EXIT.
SRUN_STAND_IN = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$CALLS/srun_args"
printf '%s' "${JAX_LOCAL_DEVICE_IDS-unset}" > "$CALLS/local_device_ids"
exit "$SRUN_EXIT"
"""

SLURM_ARGS = ["configs/tokenizer.py:seed1,gpu8x8", "/ckpt/seed1"]


def _launch_slurm(tmp_path, *flags: str, **env_vars) -> tuple[subprocess.CompletedProcess, list[str], str]:
    """Runs slurm_gpu.sbatch as the batch step (srun a stand-in), with `flags` after its
    arguments. Returns its result, srun's arguments and the JAX_LOCAL_DEVICE_IDS srun passed
    on ('unset' if none)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    for folder in (bin_dir, calls):
        folder.mkdir()
    (bin_dir / "srun").write_text(SRUN_STAND_IN)
    (bin_dir / "srun").chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "JAX_"))}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(calls), **env_vars)
    done = subprocess.run(["bash", os.path.join(LAUNCH, "slurm_gpu.sbatch"), *SLURM_ARGS, *flags], env=env,
                          capture_output=True, text=True, timeout=60)
    if not (calls / "srun_args").exists():
        return done, [], "unset"
    return (done, (calls / "srun_args").read_text().rstrip("\0").split("\0"),
            (calls / "local_device_ids").read_text())


def _gpus_jax_gives_a_slurm_task(local_device_ids: str) -> str:
    """The GPUs (`jax_cuda_visible_devices`) that `jax.distributed.initialize()`, called
    as seed_jax.main calls it, leaves the one task (SLURM_LOCALID 0) of a one-node job
    whose environment has `local_device_ids` as JAX_LOCAL_DEVICE_IDS ('unset': none)."""
    with socket.socket() as s:  # a free port for the coordinator JAX starts
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "JAX_"))}
    env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_PORT=str(port), SLURM_JOB_ID="1", SLURM_STEP_NODELIST="localhost",
               SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0")
    if local_device_ids != "unset":
        env["JAX_LOCAL_DEVICE_IDS"] = local_device_ids
    code = ("import jax; jax.distributed.initialize(None, None, None); "
            "print(jax.config.values['jax_cuda_visible_devices']); jax.distributed.shutdown()")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-1]


def test_slurm_one_process_per_node_gets_all_of_the_nodes_gpus(tmp_path):
    """JAX's SLURM detection gives a process the one GPU of its SLURM_LOCALID: with one
    task per node, each node trained on its GPU 0 alone (8 of gpu8x8's 64 GPUs)."""
    done, args, local_device_ids = _launch_slurm(tmp_path, SLURM_GPUS_ON_NODE="8", SRUN_EXIT="0")
    assert done.returncode == 0, done.stderr
    assert args == ["--kill-on-bad-exit=1", "python", "-m", "seed_jax.main", f"--config={SLURM_ARGS[0]}",
                    f"--workdir={SLURM_ARGS[1]}", "--distributed"]
    assert _gpus_jax_gives_a_slurm_task(local_device_ids) == "0,1,2,3,4,5,6,7"


def test_slurm_passes_the_flags_after_the_workdir_on(tmp_path):
    """Arguments after the workdir were dropped: a run given --config.data.train_dir=...
    trained on the preset's data instead, without a word."""
    flags = ["--config.data.train_dir=/data/my shards", "--config.stage1.num_steps=10"]
    done, args, _ = _launch_slurm(tmp_path, *flags, SLURM_GPUS_ON_NODE="8", SRUN_EXIT="0")
    assert done.returncode == 0, done.stderr
    assert args[-3:] == ["--distributed", *flags]


def test_slurm_exits_with_sruns_status(tmp_path):
    done, _, _ = _launch_slurm(tmp_path, SLURM_GPUS_ON_NODE="8", SRUN_EXIT="3")
    assert done.returncode == 3


def test_slurm_without_gpus_on_node_names_it(tmp_path):
    done, args, _ = _launch_slurm(tmp_path, SRUN_EXIT="0")
    assert done.returncode != 0 and not args
    assert "SLURM_GPUS_ON_NODE unset" in done.stderr


def test_process_flags_without_distributed_are_refused_at_parsing(repo_root, tmp_path):
    """--coordinator_address, --num_processes and --process_id without --distributed were
    ignored: each process trained alone on its own devices, all into the same workdir.
    (A subprocess: parsing absl's global flags here would change absl logging for the
    tests after it.)"""
    result = subprocess.run([sys.executable, "-m", "seed_jax.main", "--config=configs/tokenizer.py:tiny",
                             f"--workdir={tmp_path}/w", "--coordinator_address=10.0.0.2:1234", "--num_processes=2",
                             "--process_id=1"], cwd=repo_root, env={**os.environ, "PYTHONPATH": repo_root},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.startswith("FATAL Flags parsing error: "), result.stderr
    assert ("--coordinator_address, --num_processes, --process_id given without --distributed, which they are read "
            "with: add --distributed") in result.stderr, result.stderr
    assert not os.path.exists(tmp_path / "w")

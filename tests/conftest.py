"""Test set-up: 8 fake CPU devices for sharding tests (must precede JAX's backend start),
XLA's CPU compiler set to compile fast, and one compilation cache for the
session, shared with the subprocesses tests start: many tests compile the same tiny
programs, and on a 2-core machine compiling is most of their time."""

import atexit
import os
import shutil
import tempfile

# The tests compile many programs and run each a few times: with LLVM's optimisations
# off, XLA compiles for the CPU about twice as fast (the decoder's 1-vs-8-devices test
# took 109 s instead of 230 s), while matmuls and convolutions still run in XLA's
# precompiled kernels. XLA's older elemental emitters for fused ops take a fifth less
# compile time again than its MLIR fusion emitters (that test: 54-62 s of CPU time
# against 74-77 s). Appended to the caller's XLA_FLAGS; subprocesses inherit them.
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                 "--xla_backend_optimization_level=0",
                                                 "--xla_cpu_use_fusion_emitters=false"]))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

_COMPILATION_CACHE = tempfile.mkdtemp(prefix="seed_jax_test_compilation_cache_")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE  # inherited by subprocesses
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO


@pytest.fixture(scope="session")
def tiny_decoder_run(tmp_path_factory) -> str:
    """Workdir of a tiny decoder run, which trains its tiny tokenizer first (in
    WORKDIR/tokenizer); shared by the decoder and SEED-OPT tests, which only read it
    (a test that changes it works on a copy). Under pytest-xdist, its tests go to one
    worker (`pytest_collection_modifyitems`, below); should another need it (another
    `--dist` mode), it is trained once for all workers, in the run's base temp folder:
    the first worker trains it, holding a file lock, and the others wait. The run
    records its absolute paths, so it is trained where it is used, and DONE marks it
    finished: a run that a killed worker left unmarked is trained again."""
    from configs.decoder import get_config
    from seed_jax.trainers import decoder

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        workdir = str(tmp_path_factory.mktemp("decoder"))
        assert decoder.train(get_config("tiny"), workdir)
        return workdir
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # the run's base temp folder; each worker's is below it
    workdir, done = root / "tiny_decoder_run", root / "tiny_decoder_run.DONE"
    with FileLock(str(root / "tiny_decoder_run.lock")):
        if not done.exists():
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir()
            assert decoder.train(get_config("tiny"), str(workdir))
            done.touch()
    return str(workdir)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`--dist loadgroup`, pytest.ini) the tests that read the shared
    tiny run form one group, which one worker takes: it trains the run while the other
    worker runs other tests instead of waiting for it, and builds the modules' fixtures
    made from the run once. Long-running (`slow`) tests are taken first, so that none is
    left to run alone at the end. `accelerator` tests run only where JAX sees a GPU or TPU."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    for item in items:
        if "tiny_decoder_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("tiny_decoder_run"))
    if jax.default_backend() in ("gpu", "tpu"):
        return
    skip = pytest.mark.skip(reason="needs a GPU or TPU")
    for item in items:
        if "accelerator" in item.keywords:
            item.add_marker(skip)

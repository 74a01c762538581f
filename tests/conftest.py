"""Test set-up: 8 fake CPU devices for sharding tests (must precede JAX's backend start)."""

import os

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO


@pytest.fixture(scope="session")
def tiny_decoder_run(tmp_path_factory) -> str:
    """Workdir of a tiny decoder run, which trains its tiny tokenizer first (in
    WORKDIR/tokenizer); shared by the decoder and SEED-OPT tests."""
    from configs.decoder import get_config
    from seed_jax.trainers import decoder

    workdir = str(tmp_path_factory.mktemp("decoder"))
    assert decoder.train(get_config("tiny"), workdir)
    return workdir


def pytest_collection_modifyitems(config, items):
    """`accelerator` tests run only where JAX sees a GPU or TPU."""
    if jax.default_backend() in ("gpu", "tpu"):
        return
    skip = pytest.mark.skip(reason="needs a GPU or TPU")
    for item in items:
        if "accelerator" in item.keywords:
            item.add_marker(skip)

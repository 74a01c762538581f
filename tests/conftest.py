"""Test set-up: 8 fake CPU devices for sharding tests (must precede JAX's backend start)."""

import os

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO


def pytest_collection_modifyitems(config, items):
    """`accelerator` tests run only where JAX sees a GPU or TPU."""
    if jax.default_backend() in ("gpu", "tpu"):
        return
    skip = pytest.mark.skip(reason="needs a GPU or TPU")
    for item in items:
        if "accelerator" in item.keywords:
            item.add_marker(skip)

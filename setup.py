"""seed_jax: SEED image tokenizer and SEED-OPT in JAX / Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="seed_jax",
    version="0.1.0",
    description="SEED (Ge et al., 2023) image tokenizer and SEED-OPT in JAX / Flax NNX",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["seed_jax", "seed_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        # 0.7.0's extension takes 0.75 s to load (0.6.0: 6 ms), in every process that imports
        # jax: numpy compares each ufunc loop it adds with those already there
        "ml_dtypes>=0.5,!=0.7.0",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.14",  # PyTreeRestore(partial_restore=): exports read parameters alone
        "grain>=0.2.12",
        "array-record>=0.8",
        "ml-collections>=1.0",
        "chex>=0.1.90",
        "transformers>=4.50",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "numpy>=1.26",
        # 10.3: 16-bit grayscale PNGs open as I;16 (before, as I, which preprocess.to_rgb clips to white)
        "pillow>=10.3",
        "absl-py>=2.1",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # Pinned: an open range can pull a newer build with gigabytes of CUDA wheels.
        "torch": ["torch==2.13.0"],
        # Reading prepared (array_record) datasets needs no TensorFlow; preparing them does.
        "tfds": ["tensorflow-datasets>=4.9.3"],
        # pytest-xdist: the README's test command runs most tests in two workers (pytest -n 2);
        # filelock: they share one tiny training run (tests/conftest.py)
        # pytest 9.2 ignores the test ids that pytest-xdist's --dist loadgroup (pytest.ini) rewrites
        # to group tests, which then run ungrouped without a word (pytest-xdist issue 1386)
        "test": ["pytest>=8,<9.2", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "filelock>=3.10", "torch==2.13.0",
                 "diffusers>=0.30", "tensorflow-datasets>=4.9.3",
                 # executes notebooks/ in a kernel
                 "nbclient>=0.10", "nbformat>=5", "ipykernel>=6", "matplotlib>=3.8"],
        "notebooks": ["jupyter>=1.0", "nbconvert>=7", "nbformat>=5", "ipykernel>=6", "matplotlib>=3.8"],
    },
)

"""The benchmarks' FLOP counts (benchmarks/flops.py) against the matmuls our programs
actually trace: every dot_general in the jaxpr, a scanned body counted once per
iteration."""

import dataclasses
import importlib
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.extend import core as jax_core

from benchmarks import flops
from helpers import TINY_TOKENIZER
from seed_jax.models.opt import OPT, OPTConfig
from seed_jax.models.tokenizer import SeedTokenizer


def dot_flops(jaxpr) -> int:
    """2 per multiply-add of every dot_general in `jaxpr` and the jaxprs inside it."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracted, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contracted)
        repeats = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        total += sum(repeats * dot_flops(inner) for inner in _inner_jaxprs(eqn))
    return total


def _inner_jaxprs(eqn):
    """The jaxprs an equation runs (scan, jit, remat, custom_vjp bodies)."""
    for value in eqn.params.values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, jax_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax_core.Jaxpr):
                yield item


def lora_step_jaxpr(config: OPTConfig, batch: int, seq: int):
    """The gradient of benchmarks/seed_opt.py's loss with respect to the adapters."""
    model = OPT(config, rngs=nnx.Rngs(0))
    graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)

    def loss_fn(lora, ids):
        logits, _ = nnx.merge(graphdef, lora, frozen)(ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    return jax.make_jaxpr(jax.grad(loss_fn))(lora, jnp.zeros((batch, seq + 1), jnp.int32)).jaxpr


BASE = OPTConfig(vocab_size=100, extra_tokens=10, width=32, depth=3, num_heads=2, mlp_dim=96, max_positions=64,
                 lora_rank=4)


@pytest.mark.parametrize("config", [
    BASE,
    dataclasses.replace(BASE, embed_width=16, pre_layer_norm=False, lora_targets=("query", "fc2")),
], ids=["pre_ln_all_targets", "projected_embeddings_two_targets"])
def test_opt_lora_step_flops_count_every_matmul_of_the_step(config):
    batch, seq = 2, 24
    assert flops.opt_lora_step_flops(config, batch, seq) == dot_flops(lora_step_jaxpr(config, batch, seq))


def test_opt_lora_step_flops_refuse_the_codebook_projection():
    with pytest.raises(ValueError, match="config.code_dim"):
        flops.opt_lora_step_flops(dataclasses.replace(BASE, code_dim=8), 2, 24)


def test_encode_flops_count_every_matmul_of_encode():
    # the ViT wider than the Q-Former: cross-attention's key/value projections map 48 -> 32
    vit = dataclasses.replace(TINY_TOKENIZER.vit, width=48, num_heads=4, mlp_dim=96)
    config = dataclasses.replace(TINY_TOKENIZER, vit=vit,
                                 qformer=dataclasses.replace(TINY_TOKENIZER.qformer, encoder_width=48))
    graphdef, state = nnx.split(SeedTokenizer(config, rngs=nnx.Rngs(0)))
    batch, size = 3, config.vit.image_size
    jaxpr = jax.make_jaxpr(lambda s, pixels: nnx.merge(graphdef, s).encode(pixels)["codes"])(
        state, jnp.zeros((batch, size, size, 3)))
    assert batch * flops.encode_flops(config) == dot_flops(jaxpr.jaxpr)


@pytest.mark.parametrize("kind, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA H200 NVL", 835e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("cpu", None)])
def test_peak_flops_tell_the_h100_variants_apart(kind, peak):
    """A substring "H100" ("H200") gave the PCIe and NVL cards the SXM peak, so their MFU read low."""
    assert flops.peak_bf16_flops(kind) == peak


def test_seed_opt_float32_train_step_multiplies_in_float32():
    """benchmarks/seed_opt.py's LoRA step ran at JAX's default matmul precision (TF32
    on GPUs) against torch's float32 matmuls; its generation (the API) ran at "highest"."""
    from benchmarks import seed_opt

    graphdef, lora, frozen = nnx.split(OPT(BASE, rngs=nnx.Rngs(0)), nnx.LoRAParam, ...)
    tx = optax.adamw(1e-4)
    step = seed_opt.lora_train_step(graphdef, frozen, tx, "float32")
    text = step.lower(lora, tx.init(lora), jnp.zeros((2, 9), jnp.int32)).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert dots and all("precision = [HIGHEST, HIGHEST]" in line for line in dots)


@pytest.mark.slow
def test_the_benchmarks_leave_jax_no_preallocation_and_give_torch_xlas_cpu_threads(repo_root):
    """Each benchmark, imported alone (it sets both at import): JAX took 75% of the GPU's
    memory at its first use, leaving torch, timed in the same process, a quarter of it;
    torch ran its default threads (physical cores, or OMP_NUM_THREADS, here 1) against
    XLA:CPU's one per CPU the process may run on. (One process per script checks both:
    each start imports torch, transformers and JAX, about 6 s here.)"""
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
    for script in ("seed_opt", "tokenize", "decode"):
        result = subprocess.run(
            [sys.executable, "-c", f"import os, benchmarks.{script}, torch; "
             "print(os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE'), torch.get_num_threads())"],
            cwd=repo_root, env={**env, "PYTHONPATH": repo_root, "OMP_NUM_THREADS": "1"},
            capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        preallocate, threads = result.stdout.split()[-2:]
        assert preallocate == "false", script
        assert int(threads) == len(os.sched_getaffinity(0)), script


@pytest.mark.parametrize("script, argv, message", [
    ("model_build", ["--iters=0"], r"argument --iters: expected an integer >= 1, got 0"),
    ("tokenize", ["--sizes=tiny", "--iters=0"], r"argument --iters: expected an integer >= 1, got 0"),
    ("tokenize", ["--sizes=tiny,ful"], r"argument --sizes: \['ful'\] are not among \['full', 'tiny'\]"),
    ("decode", ["--steps=0"], r"argument --steps: expected an integer >= 1, got 0"),
    ("seed_opt", ["--batch=-1"], r"argument --batch: expected an integer >= 1, got -1"),
    ("sharded_decoding", ["--size=tiny", "--new_tokens=0"], r"argument --new_tokens: expected an integer >= 1"),
    ("sharded_encoding", ["--size=tiny", "--iters=x"], r"argument --iters: invalid count value: 'x'"),
    ("retrieval_memory", ["--images=0"], r"argument --images: expected an integer >= 1, got 0"),
    ("allocator", ["--rounds=0"], r"argument --rounds: expected an integer >= 1, got 0"),
    ("allocator", ["--steps=tokenizer_stage3"], r"argument --steps: \['tokenizer_stage3'\] are not among")])
def test_a_benchmarks_count_below_one_is_a_usage_error_before_it_builds_anything(script, argv, message, monkeypatch,
                                                                                capsys):
    """`--iters=0` failed in statistics.median once the models were built, converted and warmed
    up; an unknown `--sizes` name in a KeyError once the sizes before it had run."""
    module = importlib.import_module(f"benchmarks.{script}")
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as exited:
        module.main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and re.search(message, err), err

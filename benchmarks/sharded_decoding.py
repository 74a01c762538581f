"""Greedy decoding of an OPT whose weights are split over a device mesh as SEED-OPT's
training splits them (`parallel.DEFAULT_RULES`), two ways side by side in one run, their
tokens checked equal:

- rows apart: `SeedOPT(model, mesh=mesh)`, as training's evaluation decodes. Each
  device decodes its own rows, the weights gathered over fsdp once per call
  (`parallel.rows_apart`);
- weights left split: `SeedOPT(model)`. XLA's partitioner keeps the weights split
  along their width and exchanges activations in every layer of every one-token step.

  python benchmarks/sharded_decoding.py                     # 8 CPU stand-in devices, data=2 fsdp=4
  python benchmarks/sharded_decoding.py --size=opt_2.7b --mesh=data=1,fsdp=8 --batch=32 --bf16   # 8 GPUs

Random weights, `--batch` rows of `--prompt` tokens, `--new_tokens` new tokens each (no
end token: every row runs to the end); the median of `--iters` calls after a warm-up,
timed host to host. On a CPU the stand-in devices share its cores: the ratio there
shows what the exchanges cost in programs and synchronisation, not what an interconnect
would.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.timing import count, print_rows_apart_against_left_split  # noqa: E402
from seed_jax import parallel, weights  # noqa: E402
from seed_jax.api import SeedOPT  # noqa: E402
from seed_jax.models.opt import OPT_PRESETS, OPTConfig  # noqa: E402

SIZES = {  # each with SEED-OPT's 8194 image tokens appended
    # the OPTs of configs/seed_opt.py's `tiny` and `demo` presets
    "tiny": OPTConfig(vocab_size=640, width=32, depth=2, num_heads=2, mlp_dim=64, max_positions=128),
    "demo": OPTConfig(vocab_size=640, width=128, depth=4, num_heads=4, mlp_dim=512, max_positions=128),
    "small": OPTConfig(width=512, depth=8, num_heads=8, mlp_dim=2048, max_positions=256),
    "opt_2.7b": OPT_PRESETS["opt_2.7b"],
}


def mesh_axes(text: str) -> dict[str, int]:
    """"data=2,fsdp=4" -> {"data": 2, "fsdp": 4}."""
    try:
        return {name: int(size) for name, size in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise SystemExit(f"--mesh: expected axis=size pairs separated by commas (data=2,fsdp=4), got {text!r}")


def add_mesh_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both sharded benchmarks take: --mesh, --cpu_devices, --iters, --bf16."""
    parser.add_argument("--mesh", default="data=2,fsdp=4", help="axis=size pairs (parallel.MESH_AXES)")
    parser.add_argument("--cpu_devices", type=count, default=8, help="stand-in devices when JAX runs on the CPU")
    parser.add_argument("--iters", type=count, default=5)
    parser.add_argument("--bf16", action="store_true")


def built_on_mesh(kind: str, config, args) -> tuple[nnx.Module, jax.sharding.Mesh]:
    """A random-weight model of `kind` (`weights.build`) in `args.bf16`'s dtype, its weights
    split over the mesh of `args.mesh` as training splits them (`parallel.DEFAULT_RULES`)."""
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before JAX starts; the CPU backend's only
    mesh = parallel.make_mesh(mesh_axes(args.mesh), field="--mesh")
    model = weights.build(kind, config, dtype=jnp.bfloat16 if args.bf16 else jnp.float32)
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, parallel.state_shardings(state, mesh, parallel.DEFAULT_RULES)))
    return model, mesh


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--batch", type=count, default=8)
    parser.add_argument("--prompt", type=count, default=16)
    parser.add_argument("--new_tokens", type=count, default=32)
    add_mesh_arguments(parser)
    args = parser.parse_args()
    config = dataclasses.replace(SIZES[args.size], extra_tokens=8194)
    model, mesh = built_on_mesh("opt", config, args)
    dtype = "bfloat16" if args.bf16 else "float32"
    ids = np.random.default_rng(0).integers(2, config.vocab_size, (args.batch, args.prompt)).astype(np.int32)
    ways = {"rows apart": SeedOPT(model, dtype=dtype, batch_size=args.batch, mesh=mesh),
            "weights left split": SeedOPT(model, dtype=dtype, batch_size=args.batch)}
    print(f"{jax.devices()[0].device_kind} x{len(jax.devices())}, mesh {dict(mesh.shape)}, {args.size} {dtype}, "
          f"{args.batch} rows of {args.prompt} + {args.new_tokens} tokens")
    print_rows_apart_against_left_split(ways, lambda way: way.generate(ids, args.new_tokens, eos_id=None), args.iters,
                                        args.batch * args.new_tokens, "new tokens")


if __name__ == "__main__":
    main()

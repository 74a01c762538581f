"""Per-device memory of SEED-OPT 2.7B's LoRA train step under a layout preset, planned on
fake CPU devices without a GPU and without the 2.7B weights.

  python benchmarks/memory_plan.py [--layout=gpu8] [--phase=phase1 --batch=256 --seq=256 --devices=8]

The model is `configs/seed_opt.py:seed_opt_2.7b,LAYOUT` as `seed_opt.train` builds it,
from the config a conversion of facebook/opt-2.7b with SEED's 8192 codes writes
(`convert hf_opt --image_tokens=8192`: 8194 appended rows, the released config.json's
dropout 0.1; only its model.json is written, to a temporary folder) and SEED v1's
codebook (`configs/tokenizer.py:seed1`), built abstractly (`nnx.eval_shape`). Its
parameters and AdamW state take the trainer's shardings (`loop.stage_shardings`), and
the trainer's jitted step (`loop.make_train_step` with `seed_opt.lm_loss`, donated
state) is lowered and compiled for one batch of the phase (`--batch` rows of `--seq`
tokens, the phase's `max_targets_per_row` targets each, split over the batch axes as
`global_batches.global_batch` splits them) on as many fake CPU devices as the layout has (one
process: gpu8x8's 8 hosts are 64 devices here, holding the same per-device shares).

Printed per device: the frozen parameters, trainable parameters and optimizer state,
each summed from its arrays' shard shapes (exact: a GPU holds the same shards), then
`compiled.memory_analysis()`'s argument, output, alias (donated state reused for the
output) and temp bytes, and their sum argument + output - alias + temp. The temp
bytes are XLA:CPU's buffer plan for the step (activations kept for the backward pass,
gradients, collectives' buffers): XLA:GPU fuses, schedules and assigns buffers
differently, so a GPU's temp size differs; read it as an order of magnitude.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

# benchmarks/tokenize.py shadows the standard library's `tokenize` while this folder
# is first on sys.path: take the folder off, put the repository root on.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import dataclasses  # noqa: E402  (imports tokenize)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from flax import nnx  # noqa: E402

from configs import seed_opt as seed_opt_configs  # noqa: E402
from configs import tokenizer as tokenizer_configs  # noqa: E402
from seed_jax import parallel, weights  # noqa: E402
from seed_jax.convert import opt as convert_opt  # noqa: E402
from seed_jax.models import opt  # noqa: E402
from seed_jax.trainers import loop, optim, seed_opt  # noqa: E402

OPT_TEXT_VOCAB = 50265  # OPT's GPT-2 BPE tokenizer (the embedding has 50272 rows)
OPT_2_7B_DROPOUT = 0.1  # facebook/opt-2.7b's config.json (attention_dropout 0.0)
BATCH_KEYS = (("inputs", "seq"), ("segment_ids", "seq"), ("positions", "seq"), ("target_ids", "targets"),
              ("target_mask", "targets"), ("target_index", "targets"))  # `sequences._packed_row`'s, all int32
GIB = 2**30


def layout_devices(layout: str) -> int:
    """Devices of the layout preset `layout` (a `-1` axis: its other axes' product)."""
    sizes = seed_opt_configs.LAYOUT_PRESETS[layout]
    return math.prod(abs(s) for s in sizes.values())


def run_config(layout: str) -> ml_collections.ConfigDict:
    """`seed_opt_2.7b,LAYOUT`, as `python -m seed_jax.main --config=configs/seed_opt.py:...` reads it."""
    return seed_opt_configs.get_config(f"seed_opt_2.7b,{layout}")


def converted_model_config(config: ml_collections.ConfigDict) -> opt.OPTConfig:
    """The model `seed_opt.model_config` makes of `config` with `init.opt` an OPT-2.7B
    converted with SEED v1's codes (only its model.json, in a temporary folder)."""
    tokenizer = tokenizer_configs.get_config("seed1").model
    base = dataclasses.replace(opt.OPT_PRESETS["opt_2.7b"], extra_tokens=convert_opt.extra_tokens(tokenizer.num_codes),
                               dropout=OPT_2_7B_DROPOUT, attention_dropout=0.0)
    with tempfile.TemporaryDirectory() as folder:
        weights.write_config(folder, "opt", base)
        converted = config.copy_and_resolve_references()
        converted.init.opt = folder
        return seed_opt.model_config(converted, OPT_TEXT_VOCAB, tokenizer.num_codes, tokenizer.code_dim)


@dataclasses.dataclass
class AbstractStage:
    """A phase's train step as `loop.prepare_stage` builds it, on shapes alone."""
    model_config: opt.OPTConfig
    graphdef: nnx.GraphDef
    params: nnx.State  # trainable parameters (ShapeDtypeStructs)
    frozen: nnx.State  # the other parameters (ShapeDtypeStructs)
    tx: object  # the optax optimizer
    state: dict  # {"params", "opt_state", "step"} (ShapeDtypeStructs)
    state_sharding: dict
    frozen_sharding: nnx.State


def abstract_stage(config: ml_collections.ConfigDict, phase: str, mesh) -> AbstractStage:
    """The 2.7B model of `config` (`converted_model_config`) split, optimized and sharded
    for `config[phase]` on `mesh` by the trainer's own functions, without arrays."""
    model_config = converted_model_config(config)
    model = nnx.eval_shape(seed_opt.model_builder(model_config, config))
    graphdef, params, frozen = nnx.split(model, seed_opt.trainable(config), ...)
    tx = optim.make_optimizer(config[phase])
    state_sharding, frozen_sharding = loop.stage_shardings(params, frozen, tx, mesh, config.axis_rules)
    state = jax.eval_shape(lambda p: loop.init_state(p, tx), params)
    return AbstractStage(model_config, graphdef, params, frozen, tx, state, state_sharding, frozen_sharding)


def abstract_batch(batch: int, seq: int, targets: int, mesh, rules) -> dict[str, jax.ShapeDtypeStruct]:
    """One packed batch's shapes (`batch` rows of `seq` tokens, `targets` targets each),
    sharded as `global_batches.global_batch` shards it."""
    lengths = {"seq": seq, "targets": targets}
    sharding = parallel.batch_sharding(mesh, rules, 2, batch)
    return {k: jax.ShapeDtypeStruct((batch, lengths[n]), jnp.int32, sharding=sharding) for k, n in BATCH_KEYS}


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` (arrays or shapes) laid out by `shardings` (a
    prefix tree of `NamedSharding`s, as `parallel.state_shardings` returns): each
    array's shard shape times its item size, summed."""
    def held(sharding, subtree):
        return sum(math.prod(sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(subtree))

    return sum(jax.tree.leaves(jax.tree.map(held, shardings, tree)))


def total_bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def compile_step(stage: AbstractStage, config, batch: dict, mesh):
    """The trainer's jitted step (`loop.jit_train_step`), lowered and compiled for `batch`."""
    step_fn = loop.make_train_step(stage.graphdef, seed_opt.lm_loss, stage.tx, config.seed, mesh, config.axis_rules)
    jitted = loop.jit_train_step(step_fn, stage.state_sharding, stage.frozen_sharding, mesh)
    return jitted.lower(stage.state, stage.frozen, batch).compile()


def plan_rows(stage: AbstractStage, compiled) -> list[tuple[str, int]]:
    """(what, bytes per device) for the table."""
    memory = compiled.memory_analysis()
    held = [("frozen params", per_device_bytes(stage.frozen, stage.frozen_sharding)),
            ("trainable params", per_device_bytes(stage.state["params"], stage.state_sharding["params"])),
            ("optimizer state", per_device_bytes(stage.state["opt_state"], stage.state_sharding["opt_state"]))]
    compiled_rows = [("arguments", memory.argument_size_in_bytes), ("outputs", memory.output_size_in_bytes),
                     ("aliased (donated)", memory.alias_size_in_bytes),
                     ("temp (XLA:CPU plan)", memory.temp_size_in_bytes)]
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)
    return held + compiled_rows + [("args + out - alias + temp", peak)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="gpu8", choices=sorted(seed_opt_configs.LAYOUT_PRESETS))
    parser.add_argument("--phase", default="phase1", choices=[key for _, key in seed_opt.PHASES])
    parser.add_argument("--batch", type=int, default=None, help="global rows (default: the phase's batch_size)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default: data.seq_length)")
    parser.add_argument("--devices", type=int, default=None, help="fake CPU devices (default: the layout's)")
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", args.devices or layout_devices(args.layout))
    config = run_config(args.layout)
    stage_config = config[args.phase]
    batch_size, seq = args.batch or stage_config.batch_size, args.seq or config.data.seq_length
    mesh = parallel.make_mesh(config.mesh.to_dict())
    parallel.check_batch_size("--batch", batch_size, mesh, config.axis_rules)
    start = time.perf_counter()
    stage = abstract_stage(config, args.phase, mesh)
    batch = abstract_batch(batch_size, seq, stage_config.max_targets_per_row, mesh, config.axis_rules)
    compiled = compile_step(stage, config, batch, mesh)
    seconds = time.perf_counter() - start
    frozen, trainable = total_bytes(stage.frozen), total_bytes(stage.state["params"])
    print(f"SEED-OPT 2.7B LoRA step, layout {args.layout} (mesh {dict(mesh.shape)}), {args.phase}: batch "
          f"{batch_size} x {seq} tokens, {stage_config.max_targets_per_row} targets per row, dtype {config.dtype}, "
          f"remat {config.remat}; built and compiled in {seconds:.0f} s")
    print(f"parameters: {frozen / GIB:.2f} GiB frozen, {trainable / GIB:.3f} GiB trainable, all devices together")
    print(f"{'per device':<28}{'GiB':>9}")
    for name, size in plan_rows(stage, compiled):
        print(f"{name:<28}{size / GIB:>9.3f}")


if __name__ == "__main__":
    main()

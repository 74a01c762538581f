"""Per-device memory of a train step under a layout preset (SEED-OPT 2.7B's LoRA step, or
the SEED v1 tokenizer's), planned on fake CPU devices without a GPU and without weights.

  python benchmarks/memory_plan.py [--layout=gpu8] [--phase=phase1 --batch=256 --seq=256 --devices=8]
  python benchmarks/memory_plan.py --trainer=tokenizer [--layout=gpu8] [--stage=stage1 --batch=1024]

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

`--trainer=tokenizer` plans `configs/tokenizer.py:seed1,LAYOUT` (frozen EVA ViT-g, causal
Q-Former, 8192 x 32 codebook, reverse Q-Former, frozen CLIP text encoder) as
`tokenizer.train` builds it (`tokenizer.build_model`), for `--stage` (stage1: the Q-Former
and its heads train, contrastive loss, temperature clamped; stage2: the quantiser and
decoders train on 5 L_vq + 2 L_recon + 0.5 L_distill), its parameters split by
`tokenizer.trainable` and its loss and post-update from `tokenizer.stage_functions`; one
batch of the stage's batch size, each row as `pipeline.Example` makes it (an image of the
model's size, Q-Former and CLIP caption ids, an index).

Printed per device: the frozen parameters, trainable parameters and optimizer state,
each summed from its arrays' shard shapes (exact: a GPU holds the same shards), then
`compiled.memory_analysis()`'s argument, output, alias (donated state reused for the
output) and temp bytes, and their sum argument + output - alias + temp. The arguments
leave out the inputs the step does not read, which jit drops (stage II's frozen Q-Former
text branch: word table, text FFNs), while the trainer still holds them on every device:
the sum then falls short of a device's memory by their share, which the frozen row counts. The temp
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
from seed_jax.trainers import tokenizer as tokenizer_trainer  # noqa: E402

OPT_TEXT_VOCAB = 50265  # OPT's GPT-2 BPE tokenizer (the embedding has 50272 rows)
OPT_2_7B_DROPOUT = 0.1  # facebook/opt-2.7b's config.json (attention_dropout 0.0)
BATCH_KEYS = (("inputs", "seq"), ("segment_ids", "seq"), ("positions", "seq"), ("target_ids", "targets"),
              ("target_mask", "targets"), ("target_index", "targets"))  # `sequences._packed_row`'s, all int32
GIB = 2**30


LAYOUT_PRESETS = {"seed_opt": seed_opt_configs.LAYOUT_PRESETS, "tokenizer": tokenizer_configs.LAYOUT_PRESETS}
STAGES = {"seed_opt": [key for _, key in seed_opt.PHASES], "tokenizer": ["stage1", "stage2"]}


# The devices a layout names (gpu8: one host's 8 GPUs, gpu8x8: 8 such hosts, tpu_v4_32: a
# v4-32 slice's 16 chips), for presets with a -1 axis, which takes whatever devices there are.
NAMED_DEVICES = {"gpu8": 8, "gpu8x8": 64, "tpu_v4_32": 16}


def layout_devices(layout: str, trainer: str = "seed_opt") -> int:
    """Devices of `trainer`'s layout preset `layout`: its axes' product; with a `-1` axis
    the devices the layout names (`NAMED_DEVICES`), else (cpu) its other axes' product."""
    sizes = LAYOUT_PRESETS[trainer][layout]
    fixed = math.prod(abs(s) for s in sizes.values())
    if -1 not in sizes.values() or layout not in NAMED_DEVICES:
        return fixed
    if NAMED_DEVICES[layout] % fixed:
        raise ValueError(f"--layout={layout}: its fixed axes {sizes} do not divide its "
                         f"{NAMED_DEVICES[layout]} devices")
    return NAMED_DEVICES[layout]


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
    """A stage's train step as `loop.prepare_stage` builds it, on shapes alone."""
    graphdef: nnx.GraphDef
    params: nnx.State  # trainable parameters (ShapeDtypeStructs)
    frozen: nnx.State  # the other parameters (ShapeDtypeStructs)
    tx: object  # the optax optimizer
    state: dict  # {"params", "opt_state", "step"} (ShapeDtypeStructs)
    state_sharding: dict
    frozen_sharding: nnx.State
    loss_fn: object  # loss_fn(model, batch, rng) of `loop.make_train_step`
    post_update: object = None  # post_update(params, aux, rng, step) of `loop.make_train_step`


def split_stage(model: nnx.Module, trainable, stage_config, mesh, rules, loss_fn, post_update=None) -> AbstractStage:
    """The abstract `model` split into `trainable` and frozen parameters, optimized for
    `stage_config` and sharded on `mesh` by `rules`, as `loop.prepare_stage` does, without arrays."""
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    tx = optim.make_optimizer(stage_config)
    state_sharding, frozen_sharding = loop.stage_shardings(params, frozen, tx, mesh, rules)
    state = jax.eval_shape(lambda p: loop.init_state(p, tx), params)
    return AbstractStage(graphdef, params, frozen, tx, state, state_sharding, frozen_sharding, loss_fn, post_update)


def abstract_stage(config: ml_collections.ConfigDict, phase: str, mesh) -> AbstractStage:
    """The 2.7B model of `config` (`converted_model_config`) split, optimized and sharded
    for `config[phase]` on `mesh` by the trainer's own functions, without arrays."""
    model = nnx.eval_shape(seed_opt.model_builder(converted_model_config(config), config))
    return split_stage(model, seed_opt.trainable(config), config[phase], mesh, config.axis_rules, seed_opt.lm_loss)


def tokenizer_run_config(layout: str) -> ml_collections.ConfigDict:
    """`seed1,LAYOUT` of configs/tokenizer.py, as `python -m seed_jax.main --config=...` reads it."""
    return tokenizer_configs.get_config(f"seed1,{layout}")


def tokenizer_stage(config: ml_collections.ConfigDict, name: str, mesh) -> AbstractStage:
    """The tokenizer TrainModel of `config` (`tokenizer.build_model`, abstract) split,
    optimized and sharded for stage `name` on `mesh` as `tokenizer.train` does."""
    graphdef, abstract, _ = tokenizer_trainer.build_model(config)
    model = nnx.merge(graphdef, abstract)
    loss_fn, post_update = tokenizer_trainer.stage_functions(config, name)
    return split_stage(model, tokenizer_trainer.trainable(model, config[name]), config[name], mesh,
                       config.axis_rules, loss_fn, post_update)


def abstract_batch(batch: int, seq: int, targets: int, mesh, rules) -> dict[str, jax.ShapeDtypeStruct]:
    """One packed batch's shapes (`batch` rows of `seq` tokens, `targets` targets each),
    sharded as `global_batches.global_batch` shards it."""
    lengths = {"seq": seq, "targets": targets}
    sharding = parallel.batch_sharding(mesh, rules, 2, batch)
    return {k: jax.ShapeDtypeStruct((batch, lengths[n]), jnp.int32, sharding=sharding) for k, n in BATCH_KEYS}


def tokenizer_batch(config: ml_collections.ConfigDict, batch: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """One batch of `batch` rows as `pipeline.Example` makes them (image float32 (S,S,3),
    text_ids / text_mask int32 (data.max_text_length,), clip_ids int32 (clip_text.max_length,),
    index int32 ()), sharded as `global_batches.global_batch` shards it."""
    size = config.model.vit.image_size
    rows = {"image": ((size, size, 3), jnp.float32), "text_ids": ((config.data.max_text_length,), jnp.int32),
            "text_mask": ((config.data.max_text_length,), jnp.int32),
            "clip_ids": ((config.clip_text.max_length,), jnp.int32), "index": ((), jnp.int32)}
    return {k: jax.ShapeDtypeStruct((batch, *shape), dtype,
                                    sharding=parallel.batch_sharding(mesh, config.axis_rules, 1 + len(shape), batch))
            for k, (shape, dtype) in rows.items()}


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
    step_fn = loop.make_train_step(stage.graphdef, stage.loss_fn, stage.tx, config.seed, mesh, config.axis_rules,
                                   stage.post_update)
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", default="seed_opt", choices=sorted(LAYOUT_PRESETS),
                        help="seed_opt: SEED-OPT 2.7B's LoRA step; tokenizer: SEED v1's tokenizer (seed1)")
    parser.add_argument("--layout", default="gpu8", choices=sorted(set().union(*LAYOUT_PRESETS.values())))
    parser.add_argument("--phase", default=None, choices=STAGES["seed_opt"], help="seed_opt (default phase1)")
    parser.add_argument("--stage", default=None, choices=STAGES["tokenizer"], help="tokenizer (default stage1)")
    parser.add_argument("--batch", type=int, default=None, help="global rows (default: the phase's or stage's)")
    parser.add_argument("--seq", type=int, default=None, help="seed_opt: tokens per row (default: data.seq_length)")
    parser.add_argument("--devices", type=int, default=None, help="fake CPU devices (default: the layout's)")
    args = parser.parse_args()
    if args.layout not in LAYOUT_PRESETS[args.trainer]:
        parser.error(f"--layout={args.layout}: expected one of {sorted(LAYOUT_PRESETS[args.trainer])} "
                     f"for --trainer={args.trainer}")
    other = {"seed_opt": ("--stage", args.stage), "tokenizer": ("--phase", args.phase)}[args.trainer]
    if other[1] is not None or (args.trainer == "tokenizer" and args.seq is not None):
        flag = other[0] if other[1] is not None else "--seq"
        parser.error(f"{flag} is not a setting of --trainer={args.trainer}")
    return args


def print_plan(stage: AbstractStage, compiled) -> None:
    frozen, trainable = total_bytes(stage.frozen), total_bytes(stage.state["params"])
    print(f"parameters: {frozen / GIB:.2f} GiB frozen, {trainable / GIB:.3f} GiB trainable, all devices together")
    print(f"{'per device':<28}{'GiB':>9}")
    for name, size in plan_rows(stage, compiled):
        print(f"{name:<28}{size / GIB:>9.3f}")


def plan_seed_opt(args) -> None:
    config = run_config(args.layout)
    phase = args.phase or "phase1"
    stage_config = config[phase]
    batch_size, seq = args.batch or stage_config.batch_size, args.seq or config.data.seq_length
    mesh = parallel.make_mesh(config.mesh.to_dict())
    parallel.check_batch_size("--batch", batch_size, mesh, config.axis_rules)
    start = time.perf_counter()
    stage = abstract_stage(config, phase, mesh)
    batch = abstract_batch(batch_size, seq, stage_config.max_targets_per_row, mesh, config.axis_rules)
    compiled = compile_step(stage, config, batch, mesh)
    seconds = time.perf_counter() - start
    print(f"SEED-OPT 2.7B LoRA step, layout {args.layout} (mesh {dict(mesh.shape)}), {phase}: batch "
          f"{batch_size} x {seq} tokens, {stage_config.max_targets_per_row} targets per row, dtype {config.dtype}, "
          f"remat {config.remat}; built and compiled in {seconds:.0f} s")
    print_plan(stage, compiled)


def plan_tokenizer(args) -> None:
    config = tokenizer_run_config(args.layout)
    name = args.stage or "stage1"
    batch_size = args.batch or tokenizer_trainer.stage_batch_size(config, name)
    mesh = parallel.make_mesh(config.mesh.to_dict())
    parallel.check_batch_size("--batch", batch_size, mesh, config.axis_rules)
    start = time.perf_counter()
    stage = tokenizer_stage(config, name, mesh)
    batch = tokenizer_batch(config, batch_size, mesh)
    compiled = compile_step(stage, config, batch, mesh)
    seconds = time.perf_counter() - start
    size = config.model.vit.image_size
    print(f"SEED tokenizer (seed1) {name} step, layout {args.layout} (mesh {dict(mesh.shape)}): batch {batch_size} "
          f"images of {size} x {size} px, captions of {config.data.max_text_length} (Q-Former) and "
          f"{config.clip_text.max_length} (CLIP) tokens, dtype {config.dtype}, remat {config.remat}; "
          f"built and compiled in {seconds:.0f} s")
    print_plan(stage, compiled)


def main():
    args = parse_args()
    jax.config.update("jax_platforms", "cpu")  # fake CPU devices, also on a machine with a GPU
    jax.config.update("jax_num_cpu_devices", args.devices or layout_devices(args.layout, args.trainer))
    {"seed_opt": plan_seed_opt, "tokenizer": plan_tokenizer}[args.trainer](args)


if __name__ == "__main__":
    main()

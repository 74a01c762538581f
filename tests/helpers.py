"""Tiny model configs and checks shared by the tests."""

import contextlib
import dataclasses
import math
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

from seed_jax import weights
from seed_jax.models.clip_text import CLIPTextConfig
from seed_jax.models.qformer import QFormerConfig
from seed_jax.models.stable_diffusion import StableDiffusionConfig
from seed_jax.models.tokenizer import SeedTokenizerConfig
from seed_jax.models.unet import UNET_PRESETS
from seed_jax.models.vit import ViTConfig

TINY_VIT = ViTConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64)
TINY_QFORMER = QFormerConfig(width=32, num_layers=4, num_heads=2, mlp_dim=64, encoder_width=32, num_queries=32,
                             vocab_size=50, max_positions=40, dropout=0.0)
TINY_REVERSE = QFormerConfig(width=32, num_layers=2, num_heads=2, mlp_dim=64, encoder_width=32, num_queries=77,
                             causal_queries=False, with_text=False, dropout=0.0)
TINY_TOKENIZER = SeedTokenizerConfig(vit=TINY_VIT, qformer=TINY_QFORMER, reverse_qformer=TINY_REVERSE,
                                     num_codes=64, code_dim=8, decoder_depth=2, decoder_heads=2,
                                     decoder_mlp_dim=64, generation_width=24, proj_dim=16)
# A pixel-space tiny UNet whose text encoder (and context) is as wide as TINY_TOKENIZER's generation embeddings.
TINY_DIFFUSION = StableDiffusionConfig(
    unet=dataclasses.replace(UNET_PRESETS["tiny"], in_channels=3, out_channels=3), vae=None,
    text_encoder=CLIPTextConfig(vocab_size=10, width=24, depth=1, num_heads=2, mlp_dim=32),
    empty_prompt_ids=(8,) + (9,) * 76)


def write_with_a_damaged_record(path: str, payloads: list[bytes], damaged: int) -> None:
    """ArrayRecord file `path` of `payloads` (a chunk each, uncompressed) with one bit of
    payload `damaged` flipped on disk: reading that record fails its chunk's checksum."""
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(path, "group_size:1,uncompressed")
    for payload in payloads:
        writer.write(payload)
    writer.close()
    data = bytearray(open(path, "rb").read())
    data[data.index(payloads[damaged]) + len(payloads[damaged]) // 2] ^= 1
    with open(path, "wb") as f:
        f.write(data)


def flat_arrays(tree, shardings) -> dict[str, tuple[jax.ShapeDtypeStruct, jax.sharding.NamedSharding]]:
    """Dotted path -> (shape, sharding) of each parameter of `tree` (an nnx.State of
    shapes or arrays; `shardings` its NamedShardings, as `parallel.state_shardings` gives)."""
    sharding_of = dict(nnx.to_flat_state(shardings))
    return {".".join(map(str, path)): (var.get_value(), sharding_of[path]) for path, var in nnx.to_flat_state(tree)}


def assert_weights_split(stage, devices: int) -> dict[str, tuple[jax.ShapeDtypeStruct, jax.sharding.NamedSharding]]:
    """For a train step planned on shapes (`benchmarks/memory_plan.py`'s stages): no
    parameter over 1 MiB is replicated, every frozen array over 16 MiB is split over
    fsdp, and a device holds 1/`devices` of the frozen bytes (within 1 %). Returns the
    frozen arrays (`flat_arrays`)."""
    from benchmarks.memory_plan import per_device_bytes, total_bytes

    frozen = flat_arrays(stage.frozen, stage.frozen_sharding)
    trainable = flat_arrays(stage.state["params"], stage.state_sharding["params"])
    for name, (x, sharding) in {**frozen, **trainable}.items():
        size = math.prod(x.shape) * x.dtype.itemsize
        if size > 2**20:
            assert not sharding.is_fully_replicated, f"{name} {x.shape} is replicated"
        if name in frozen and size > 16 * 2**20:
            assert "fsdp" in jax.tree.leaves(tuple(sharding.spec)), f"{name} {x.shape}: {sharding.spec}"
    held = per_device_bytes(stage.frozen, stage.frozen_sharding)
    assert held == pytest.approx(total_bytes(stage.frozen) / devices, rel=0.01)
    return frozen


def layout_mesh(sizes, devices: int) -> jax.sharding.AbstractMesh:
    """A device-less mesh of a layout preset's axis `sizes` (-1: what `devices` leave),
    for shardings of shapes on more devices than the tests have."""
    from seed_jax import parallel

    shape = parallel.mesh_shape(dict(sizes), devices)
    return jax.sharding.AbstractMesh(tuple(shape.values()), tuple(shape))


def assert_optimizer_state_split_as_params(stage) -> None:
    """AdamW's two moments take the trainable parameters' layout: a device holds twice
    their share (and the step count)."""
    from benchmarks.memory_plan import per_device_bytes

    params = per_device_bytes(stage.state["params"], stage.state_sharding["params"])
    moments = per_device_bytes(stage.state["opt_state"], stage.state_sharding["opt_state"])
    assert moments == pytest.approx(2 * params, rel=1e-6), (moments, params)


FULL_REMATERIALIZATION = "Involuntary full rematerialization"


def _compile_a_lookup_xla_rematerializes() -> None:
    """A program XLA's partitioner compiles only by copying a whole array to every device
    (on a 2x2x2 mesh: a table split along its width over `fsdp`, looked up by ids split
    over `data` x `fsdp` into rows split the same way): the known positive for
    `assert_compiles_without_full_rematerialization`."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    table = jax.ShapeDtypeStruct((64, 32), np.float32, sharding=NamedSharding(mesh, P(None, "fsdp")))
    ids = jax.ShapeDtypeStruct((8, 4), np.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    rows = NamedSharding(mesh, P(("data", "fsdp"), None, None))
    jax.jit(lambda t, i: t[i], out_shardings=rows).lower(table, ids).compile()


def assert_compiles_without_full_rematerialization(setup, batch, capfd) -> None:
    """Compiles `setup`'s train step (`loop.prepare_stage`) for `batch` with the
    compilation cache off (a cached program compiles silently) and asserts XLA's
    partitioner printed no "Involuntary full rematerialization" (a sharding it could
    not reach but by copying a whole array to every device). A program known to print it
    is compiled first and must: otherwise XLA's log does not reach stderr here (e.g.
    TF_CPP_MIN_LOG_LEVEL), or XLA words it otherwise, and the check would pass blind."""
    with compilation_cache_off():
        capfd.readouterr()
        _compile_a_lookup_xla_rematerializes()
        assert FULL_REMATERIALIZATION in capfd.readouterr().err, (
            f"XLA printed no {FULL_REMATERIALIZATION!r} for a program that needs one: this check cannot see it "
            f"(a silenced log, TF_CPP_MIN_LOG_LEVEL={os.environ.get('TF_CPP_MIN_LOG_LEVEL')!r}? a compile that "
            "was not one?)")
        setup.train_step.lower(setup.state, setup.frozen, batch).compile()
    assert FULL_REMATERIALIZATION not in capfd.readouterr().err


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
               "collective-broadcast", "ragged-all-to-all")


def collectives_in_loop_bodies(hlo: str) -> list[str]:
    """The cross-device operations of compiled HLO text (`jitted.lower(...).compile().as_text()`)
    that run inside a while loop's body, or in a computation such a body calls: those run
    once per iteration. Loop conditions are left out."""
    computations, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            name = header.group(1)
            computations[name] = []
        elif name is not None:
            computations[name].append(line)
    bodies = {b for lines in computations.values() for line in lines for b in re.findall(r"body=%?([\w.\-]+)", line)}
    reached, found = set(), []
    while bodies:
        body = bodies.pop()
        if body in reached:
            continue
        reached.add(body)
        for line in computations.get(body, []):
            bodies.update(re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line))
            for called in re.findall(r"branch_computations=\{([^}]*)\}", line):
                bodies.update(c.strip().lstrip("%") for c in called.split(","))
            found += [line.strip() for op in COLLECTIVES if re.search(rf"\b{op}(-start)?\(", line)]
    return found


@contextlib.contextmanager
def compilation_cache_off():
    """Compiles in the block really compile (and log), not read the session's
    compilation cache or the programs this process holds. JAX decides once per process
    whether it uses the cache, so the flag alone does nothing after the first compile:
    the decision is reset, before and after."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    jax.clear_caches()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def latest_state_path(workdir, stage) -> str:
    """The train-state directory of `stage`'s latest checkpoint in `workdir`."""
    directory = os.path.join(workdir, "checkpoints", stage)
    step = max(int(d) for d in os.listdir(directory) if d.isdigit())
    return os.path.join(directory, str(step), "state")


def saved_as_numpy(path) -> dict:
    """The orbax pytree at `path` as host numpy arrays, whatever devices wrote it (a
    multi-process run's included): restored without target shardings, orbax would place
    its arrays as they were saved, a placement it warns is unsafe on another topology."""
    checkpointer = ocp.PyTreeCheckpointer()
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                            checkpointer.metadata(path).item_metadata.tree)
    return checkpointer.restore(path, restore_args=as_numpy)


def checkpoint_params(workdir, stage, module: str | None = "tokenizer") -> dict:
    """{dotted name: array} of the trained parameters in `stage`'s latest checkpoint,
    those under `module` (None: all of them)."""
    params = saved_as_numpy(latest_state_path(workdir, stage))["params"]
    flat = weights.flatten_nested(params[module] if module else params)  # raw nnx state: each leaf under "value"
    return {name.removesuffix(".value"): value for name, value in flat.items()}


def start_two_processes(repo_root, args: list[str], logs: list | None = None,
                        program: tuple[str, ...] = ("-m", "seed_jax.main"),
                        env: dict | None = None) -> list[subprocess.Popen]:
    """Starts `python -m seed_jax.main *args` (or `python *program *args`) as two JAX
    processes on loopback, 4 CPU devices each, given main's flags for them (and `env`
    added to the environment); their output goes to the files `logs`, else to pipes."""
    with socket.socket() as free:  # a port no one holds now
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4",
           "PYTHONPATH": repo_root, **(env or {})}
    outputs = [open(log, "w") for log in logs] if logs else [subprocess.PIPE] * 2
    try:
        return [subprocess.Popen(
            [sys.executable, *program, *args, "--distributed", f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={i}"], cwd=repo_root, env=env, stdout=outputs[i],
            stderr=subprocess.STDOUT, text=True) for i in range(2)]
    finally:
        for output in outputs:
            if output is not subprocess.PIPE:
                output.close()  # the processes hold their own


def run_two_processes(repo_root, args: list[str], program: tuple[str, ...] = ("-m", "seed_jax.main")) -> list[str]:
    """`start_two_processes` waited for; both must exit 0. Returns their outputs."""
    procs = start_two_processes(repo_root, args, program=program)
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    return outputs


# `python -m seed_jax.main` whose distributed processes wait 3 s for each other at exit
# (JAX's shutdown timeout, 300 s by default) and whose process 0 takes 10 s to write an
# export: the run passes only when the others wait for process 0's export.
MAIN_WITH_A_SLOW_EXPORT = """
import time
import jax
from seed_jax import main, weights
initialize, save = jax.distributed.initialize, weights.save
jax.distributed.initialize = lambda *args: initialize(*args, shutdown_timeout_seconds=3)
def slow_save(*args, **kwargs):
    time.sleep(10)
    save(*args, **kwargs)
weights.save = slow_save
main.app.run(main.main)
"""


def seed_opt_losses_on_one_batch(mesh_axes: dict[str, int], num_steps: int = 3) -> list[float]:
    """The tiny SEED-OPT's losses over `num_steps` train steps on one fixed random global
    batch of 8 packed rows, process p of P feeding rows [8p/P, 8(p+1)/P) of it, on a mesh
    of `mesh_axes` over every process's devices."""
    from configs.seed_opt import get_config
    from seed_jax import parallel
    from seed_jax.trainers import global_batches, loop, seed_opt

    config = get_config("tiny")
    config.mesh.update(mesh_axes)
    mesh = parallel.make_mesh(config.mesh.to_dict())
    m_config = seed_opt.model_config(config, text_vocab_size=100, num_codes=64, code_dim=8)
    model = seed_opt.create_model(m_config, config, mesh)
    setup = loop.prepare_stage(model, seed_opt.trainable(config), seed_opt.lm_loss, config.phase1, config, mesh)
    rows, length, targets = 8, config.data.seq_length, config.phase1.max_targets_per_row
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, 160, (rows, length)), "segment_ids": np.ones((rows, length)),
             "positions": np.tile(np.arange(length), (rows, 1)), "target_ids": rng.integers(0, 160, (rows, targets)),
             "target_index": np.sort(rng.integers(0, length, (rows, targets)), axis=1),
             "target_mask": rng.random((rows, targets)) < 0.7}
    process, count = jax.process_index(), jax.process_count()
    local = {k: v[process * rows // count:(process + 1) * rows // count].astype(np.int32) for k, v in batch.items()}
    state, losses = setup.state, []
    for _ in range(num_steps):
        state, metrics = setup.train_step(state, setup.frozen, global_batches.global_batch(local, mesh, config.axis_rules))
        losses.append(float(metrics["loss"]))
    return losses


# Prints `seed_opt_losses_on_one_batch` of one of two processes (`run_two_processes`'s flags).
TWO_PROCESSES_ON_ONE_BATCH = """
import sys
import jax
flags = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
jax.distributed.initialize(flags["--coordinator_address"], int(flags["--num_processes"]), int(flags["--process_id"]))
sys.path.insert(0, "tests")
import helpers
print("losses", *helpers.seed_opt_losses_on_one_batch(dict(data=1, fsdp=8)))
"""


def inference_outputs(opt) -> dict[str, np.ndarray]:
    """What `opt` (a `SeedOPT` with a `SeedTokenizer`, batch_size 4, loaded from a tiny OPT
    export of 60 text ids and TINY_TOKENIZER's export) computes for fixed inputs: logits and
    greedy, sampled and beam-searched tokens of 3 prompts (one left-padded; a chunk of 4 rows,
    one a copy), greedy tokens of 1, codes of 6 images (a full chunk and a padded one) and
    of 1, generation embeddings and image features of 3."""
    rng = np.random.default_rng(0)
    ids, pixels = rng.integers(2, 60, (3, 5)).astype(np.int32), rng.standard_normal((6, 32, 32, 3), np.float32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    prompts = dict(attention_mask=mask, eos_id=None)
    codes = opt.tokenizer.encode(pixels)
    return {"logits": opt.logits(ids, mask), "greedy": opt.generate(ids, 6, **prompts),
            "greedy_1": opt.generate(ids[:1], 6, eos_id=None),
            "sampled": opt.generate(ids, 6, temperature=1.0, seed=3, **prompts),
            "beams": opt.generate(ids, 6, num_beams=2, **prompts),
            "codes": codes, "codes_1": opt.tokenizer.encode(pixels[:1]),
            "embeds": opt.tokenizer.embed_codes(codes[:3]), "features": opt.tokenizer.image_features(pixels[:3])}


def own_pixels(process: int) -> np.ndarray:
    """Process `process`'s own (5,32,32,3) batch, for a tokenizer on its local devices alone."""
    return np.random.default_rng(10 + process).standard_normal((5, 32, 32, 3), np.float32)


def errors_of_inputs_that_differ(opt, process: int) -> dict[str, str]:
    """The error of each `opt` call (as `inference_outputs`') whose input or option
    depends on `process`, "" where a call raised none. Unchecked, each call would run the
    same programs on both processes and return a mix of their rows. Decoding runs without
    an end token: with one (or with another max_new_tokens per process) the processes'
    decoding loops could stop at different steps and, unchecked, wait for each other forever."""
    rng = np.random.default_rng(0)
    ids, pixels = rng.integers(2, 60, (3, 5)).astype(np.int32), rng.standard_normal((6, 32, 32, 3), np.float32)
    changed, mask = ids.copy(), np.ones_like(ids)
    changed[2, 4] = 2 + (changed[2, 4] - 2 + process) % 58
    mask[0, 0] = 1 - process
    images = np.full((2, 40, 40, 3), 100 + process, np.uint8)
    calls = {"logits": lambda: opt.logits(changed),
             "generate": lambda: opt.generate(ids, 6, attention_mask=mask, eos_id=None),
             "sampled": lambda: opt.generate(ids, 6, temperature=1.0, seed=3 + process, eos_id=None),
             "encode": lambda: opt.tokenizer.encode(pixels + process),
             "encode_images": lambda: opt.tokenizer.encode_images(images),
             "embed_codes": lambda: opt.tokenizer.embed_codes(np.full((2, 32), process, np.int32)),
             "image_features": lambda: opt.tokenizer.image_features(pixels[process:process + 3])}
    errors = {}
    for name, call in calls.items():
        try:
            call()
            errors[name] = ""
        except ValueError as error:
            errors[name] = str(error)
    return errors


# Saves `inference_outputs` of `SeedOPT.load(FOLDER/opt, tokenizer=TOKENIZER)` as FOLDER/PROCESS.npz
# (the arguments FOLDER TOKENIZER, then `run_two_processes`'s flags), on a data 2 x fsdp 2 x tensor 2 mesh over
# both processes' 8 devices laid out so that data and fsdp cross the processes: the weights are gathered over
# fsdp from both, and each process holds half of a chunk's rows (were tensor to cross them too, each would
# hold a copy of every row, and an output left split would still read back whole); then
# `errors_of_inputs_that_differ` as FOLDER/PROCESS.json, and the codes of `own_pixels` from a SeedTokenizer
# on the process's own devices (a mesh of them alone) as FOLDER/PROCESS_own.npy.
TWO_PROCESSES_INFER = """
import json
import sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
flags = dict(a.split("=", 1) for a in sys.argv[3:] if "=" in a)
jax.distributed.initialize(flags["--coordinator_address"], int(flags["--num_processes"]), int(flags["--process_id"]))
import numpy as np
sys.path.insert(0, "tests")
import helpers
from seed_jax import api, parallel
(folder, tokenizer), devices = sys.argv[1:3], jax.devices()
mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2), devices=[devices[i] for i in (0, 1, 4, 5, 6, 7, 2, 3)])
processes = np.vectorize(lambda d: d.process_index)(mesh.devices)
assert parallel.axes_spanning_processes(processes, mesh.axis_names, ()) == ["data", "fsdp"], processes
opt = api.SeedOPT.load(f"{folder}/opt", tokenizer=tokenizer, batch_size=4, mesh=mesh)
np.savez(f"{folder}/{jax.process_index()}.npz", **helpers.inference_outputs(opt))
with open(f"{folder}/{jax.process_index()}.json", "w") as f:
    json.dump(helpers.errors_of_inputs_that_differ(opt, jax.process_index()), f)
own = api.SeedTokenizer.load(tokenizer, batch_size=4, mesh=parallel.make_mesh(dict(data=-1), devices=jax.local_devices()))
np.save(f"{folder}/{jax.process_index()}_own.npy", own.encode(helpers.own_pixels(jax.process_index())))
"""


def assert_export_holds_both_stages(workdir, out, repo_root) -> None:
    """Runs `python -m seed_jax.export` on `workdir` and checks that every parameter
    each stage's latest checkpoint holds is exported unchanged."""
    result = subprocess.run([sys.executable, "-m", "seed_jax.export", f"--workdir={workdir}", f"--out={out}"],
                            cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    exported = weights.load_params(out)
    for stage in ("stage1", "stage2"):
        for name, value in checkpoint_params(workdir, stage).items():
            np.testing.assert_array_equal(exported[name], value, err_msg=f"{stage} {name}")


def decoder_with_text_encoder_changed(decoder: str, out: str, change) -> str:
    """A copy of the export `decoder` at `out` whose text encoder parameters are
    `change({name: array})`."""
    kind, sd_config, info = weights.read_config(decoder)
    params = weights.load_params(decoder)
    params.update(change({k: v for k, v in params.items() if k.startswith("text_encoder.")}))
    weights.save(out, kind, sd_config, params, info)
    return out


def stage_gradients(model, trainable, loss_fn, run, mesh, batch: dict, stage_index=None) -> dict[str, jax.Array]:
    """The train step's loss gradients (`loop.make_gradients`) at step 0 of `model`'s
    `trainable` parameters, jitted with the stage's shardings on `mesh` (`run`: its seed and
    axis_rules), by parameter path. Each trainable parameter is first moved by 0.02 x a
    fixed normal draw: zero-initialised ones (biases, LoRA's B) make others' gradients
    exactly 0 (LoRA's A), where a wrong partitioning would go unseen."""
    import optax

    from seed_jax.trainers import global_batches, loop

    rules = run.axis_rules
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(next(keys), p.shape, p.dtype), params)
    no_optimizer = optax.identity()  # the train state's layout, without optimizer state
    state_sharding, frozen_sharding = loop.stage_shardings(params, frozen, no_optimizer, mesh, rules)
    state = jax.device_put(loop.init_state(params, no_optimizer), state_sharding)
    gradients = jax.jit(loop.make_gradients(graphdef, loss_fn, run.seed, mesh, rules, stage_index),
                        in_shardings=(state_sharding, frozen_sharding, None),
                        out_shardings=(None, state_sharding["params"], None))
    _, grads, _ = gradients(state, jax.device_put(frozen, frozen_sharding),
                            global_batches.global_batch(batch, mesh, rules))
    return {"/".join(str(k) for k in path): g[...] for path, g in nnx.to_flat_state(grads)}


def split_over_fsdp_and_tensor(grads: dict[str, jax.Array]) -> list[str]:
    """The names of `grads` whose arrays are split over both the fsdp and tensor mesh axes."""
    def axes(spec):
        return {a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)}

    return [name for name, g in grads.items() if {"fsdp", "tensor"} <= axes(g.sharding.spec)]


def assert_same_gradients(grads: dict[str, jax.Array], reference: dict[str, jax.Array], zero: tuple[str, ...] = ()):
    """Each parameter's gradient in `grads` (a mesh's) within 1e-4 of its norm in `reference`
    (1 device's): the same float32 sums added in another order differ by about 1e-6 of it,
    where a wrongly partitioned one is off by a large part of it (the decoder's convolutions:
    25-135 %). Parameters named ending with one of `zero` (an attention key bias: softmax
    ignores a score shared by every key) have gradient 0 in exact arithmetic, so their
    computed ones are rounding noise: both must stay below 1e-6 of the global norm (about ten
    float32 epsilons; measured: 1e-9)."""
    assert grads.keys() == reference.keys()
    grads, reference = ({k: np.asarray(v, np.float64) for k, v in t.items()} for t in (grads, reference))
    scale = np.sqrt(sum(np.sum(r ** 2) for r in reference.values()))
    assert np.isfinite(scale) and scale > 0
    unmatched = [suffix for suffix in zero if not any(name.endswith(suffix) for name in reference)]
    assert not unmatched, f"no parameter ends with {unmatched}"
    for name, r in reference.items():
        norm, error = np.linalg.norm(r), np.linalg.norm(grads[name] - r)
        if name.endswith(zero):
            assert max(norm, np.linalg.norm(grads[name])) <= 1e-6 * scale, (name, norm / scale, error / scale)
        else:
            assert error <= 1e-4 * norm, (name, norm / scale, error / max(norm, 1e-300))

"""Train steps of both stages: 1 device vs an 8-device mesh, resume equality, SIGTERM."""

import gc
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import struct
import sys
import time
import types
import weakref

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from tensorboardX import event_file_writer
from tensorboardX.proto.event_pb2 import Event, SessionLog

from configs.tokenizer import STAGE2_TRAINABLE, get_config
from helpers import (assert_compiles_without_full_rematerialization, assert_export_holds_both_stages,
                     assert_optimizer_state_split_as_params, assert_same_gradients, assert_weights_split,
                     checkpoint_params, latest_state_path, layout_mesh, run_two_processes, saved_as_numpy,
                     split_over_fsdp_and_tensor, stage_gradients, start_two_processes)
from seed_jax import command_line, parallel, weights
from seed_jax.data import pipeline
from seed_jax.evaluators.codebook import codebook_usage
from seed_jax.evaluators.retrieval import recall_at_k
from seed_jax.trainers import checkpointing, coordination, global_batches, loop, optim, reporting, run_config
from seed_jax.trainers import tokenizer as trainer


def _tiny(**overrides):
    config = get_config("tiny")
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


def _batch(config, rng):
    b, s = config.batch_size, config.model.vit.image_size
    keys = jax.random.split(jax.random.key(rng), 3)
    return {"image": np.asarray(jax.random.normal(keys[0], (b, s, s, 3))),
            "text_ids": np.asarray(jax.random.randint(keys[1], (b, 12), 5, 60), np.int32),
            "text_mask": np.ones((b, 12), np.int32),
            "clip_ids": np.asarray(jax.random.randint(keys[2], (b, 77), 0, 128), np.int32),
            "index": np.arange(b, dtype=np.int32)}


def _stage_setup(config, mesh, stage_name) -> loop.StageSetup:
    """The trainer's train step for `stage_name` of a freshly built `config` model on `mesh`."""
    _, _, create = trainer.build_model(config)
    model = create()
    loss_fn, post_update = trainer.stage_functions(config, stage_name)
    return loop.prepare_stage(model, trainer.trainable(model, config[stage_name]), loss_fn, config[stage_name],
                              config, mesh, post_update)


def _losses(config, mesh, stage_name, num_steps=3):
    setup = _stage_setup(config, mesh, stage_name)
    initial = jax.tree.map(np.asarray, setup.state["params"])
    state, losses = setup.state, []
    for i in range(num_steps):
        batch = global_batches.global_batch(_batch(config, i), mesh, config.axis_rules)
        state, metrics = setup.train_step(state, setup.frozen, batch)
        losses.append(float(metrics["loss"]))
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), initial, state["params"]))
    assert all(changed), "a trainable parameter did not change"
    return losses, state


@pytest.mark.slow
@pytest.mark.parametrize("stage_name", ["stage1", "stage2"])
def test_train_step_same_loss_on_1_and_8_devices(stage_name):
    config = _tiny()
    one = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    eight = parallel.make_mesh({"data": 2, "fsdp": 4})
    losses_1, _ = _losses(config, one, stage_name)
    losses_8, state_8 = _losses(config, eight, stage_name)
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-4)
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state_8["params"])]
    assert any("fsdp" in str(spec) for spec in specs), "no parameter is sharded over fsdp"
    trained = {str(path[1].key) for path, _ in jax.tree_util.tree_flatten_with_path(state_8["params"])[0]}
    # Stage I trains ln_vision with the Q-Former, as LAVIS's BLIP-2 stage 1; stage II freezes both.
    assert ({"ln_vision", "qformer"} <= trained) == (stage_name == "stage1"), trained


@pytest.mark.slow
@pytest.mark.parametrize("stage_name", ["stage1", "stage2"])
def test_train_step_same_gradients_on_1_and_8_devices(stage_name):
    """Every trainable parameter's loss gradient on a data x fsdp and on a data x fsdp x
    tensor mesh is the 1-device one (`assert_same_gradients`; attention key biases' are 0):
    XLA's partitioner once got the decoder's kernel gradients wrong on such a mesh while the
    losses still matched."""
    config = _tiny()
    batch = _batch(config, 0)

    def gradients(mesh):
        model = trainer.build_model(config)[2]()
        loss_fn, _ = trainer.stage_functions(config, stage_name)
        return stage_gradients(model, trainer.trainable(model, config[stage_name]), loss_fn, config, mesh, batch)

    reference = gradients(parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    for axes in ({"data": 2, "fsdp": 4}, {"data": 2, "fsdp": 2, "tensor": 2}):
        grads = gradients(parallel.make_mesh(axes))
        assert_same_gradients(grads, reference, zero=("k_bias",))
    assert split_over_fsdp_and_tensor(grads), "no gradient is split over fsdp and tensor"


@pytest.mark.parametrize("stage_name", ["stage1", "stage2"])
def test_the_train_step_keeps_the_batch_split_on_a_mesh_with_data_and_fsdp(stage_name, capfd):
    """The Q-Former's word and position lookups (stage I's text features), with tables
    split over fsdp along their width and ids over data x fsdp, made XLA copy the whole
    batch's (B,L,D) embeddings to every device ("involuntary full rematerialization")
    once data > 1, as on gpu8x8 and tpu_v4_32 (benchmarks/memory_plan.py --trainer=tokenizer).
    Stage II's step, which has no text path, is held to the same."""
    config = _tiny()
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    setup = _stage_setup(config, mesh, stage_name)
    batch = global_batches.global_batch(_batch(config, 0), mesh, config.axis_rules)
    assert_compiles_without_full_rematerialization(setup, batch, capfd)


@pytest.fixture(scope="module", params=["stage1", "stage2"])
def seed1_gpu8_stage(request):
    """SEED v1's tokenizer train step (`seed1`) under the gpu8 layout for each stage, shapes
    alone (benchmarks/memory_plan.py --trainer=tokenizer), with its mesh."""
    from benchmarks import memory_plan

    config = memory_plan.tokenizer_run_config("gpu8")
    mesh = parallel.make_mesh(config.mesh.to_dict())
    return mesh, memory_plan.tokenizer_stage(config, request.param, mesh)


def test_the_seed1_weights_split_over_the_gpu8_mesh(seed1_gpu8_stage):
    """No parameter over 1 MiB is replicated (the 8192 x 32 codebook, 1 MiB, is, as every
    device searches it whole), every frozen array over 16 MiB (ViT-g's, CLIP's and the
    frozen decoders' kernels, CLIP's token table) is split over fsdp, and a device holds an
    eighth of the frozen weights, and of the frozen ViT-g (within 1 %)."""
    from benchmarks.memory_plan import per_device_bytes, total_bytes

    mesh, stage = seed1_gpu8_stage
    assert mesh.size == 8
    frozen = assert_weights_split(stage, devices=8)
    vit = "tokenizer.visual_encoder.blocks.blocks."
    assert {vit + "mlp.fc1.kernel", vit + "mlp.fc2.kernel", vit + "attn.query", "clip_text.token_embedding"} <= set(frozen)
    vit_weights = stage.frozen["tokenizer"]["visual_encoder"]
    assert total_bytes(vit_weights) > 3 * 2**30  # ViT-g: 1B parameters in float32
    held = per_device_bytes(vit_weights, stage.frozen_sharding["tokenizer"]["visual_encoder"])
    assert held == pytest.approx(total_bytes(vit_weights) / 8, rel=0.01)


@pytest.mark.parametrize("stage_name", ["stage1", "stage2"])
@pytest.mark.parametrize("layout", ["gpu8", "gpu8x8", "tpu_v4_32"])
def test_the_seed1_weights_and_optimizer_state_split_over_each_layout(layout, stage_name):
    """Each layout preset's fsdp axis splits SEED v1's weights (as on gpu8, above) and the
    AdamW state with them, on a device-less mesh of its size (gpu8x8: 64 devices)."""
    from benchmarks import memory_plan

    config = memory_plan.tokenizer_run_config(layout)
    mesh = layout_mesh(config.mesh, memory_plan.layout_devices(layout, "tokenizer"))
    stage = memory_plan.tokenizer_stage(config, stage_name, mesh)
    assert_weights_split(stage, devices=mesh.shape["fsdp"] * mesh.shape["tensor"])
    assert_optimizer_state_split_as_params(stage)


def _final_state(workdir, stage="stage2"):
    return saved_as_numpy(latest_state_path(workdir, stage))


def _eval_lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"split": "eval"' in line]


@pytest.mark.slow
def test_preempted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    config = _tiny(**{"stage1.num_steps": 6, "stage2.num_steps": 6, "eval_every_steps": 6})
    assert trainer.train(config, str(tmp_path / "straight"))

    calls = {"n": 0}

    def preempt_at_step_5(self, sync):
        calls["n"] += 1
        return calls["n"] == 5  # stage 1, step 5: not a checkpoint step

    monkeypatch.setattr(coordination.Preemption, "requested", preempt_at_step_5)
    resumed = str(tmp_path / "resumed")
    assert not trainer.train(config, resumed)
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints", "stage1"))) == ["4", "5"]
    monkeypatch.setattr(coordination.Preemption, "requested", lambda self, sync: False)
    assert trainer.train(config, resumed)

    straight, again = _final_state(str(tmp_path / "straight")), _final_state(resumed)
    jax.tree.map(np.testing.assert_array_equal, straight, again)
    assert _eval_lines(str(tmp_path / "straight"))[-1] == _eval_lines(resumed)[-1]


class _Line(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.full((4,), 0.1))
        self.b = nnx.Param(jnp.zeros(()))


def _nan_gradient_at_step_4(model, batch, rng):
    """A finite loss whose gradient is NaN for the batch of step 4 (sqrt'(0) * 0)."""
    y = batch["x"] @ model.w[...] + model.b[...]
    at_step_4 = (batch["x"][0, 0] == 4).astype(jnp.float32)
    return jnp.mean((y - 1.0) ** 2) + jnp.sqrt(model.b[...] * 0.0 + 1.0 - at_step_4), ({}, {})


def test_a_non_finite_step_raises_before_any_checkpoint_of_it(tmp_path):
    """Step 4's loss is finite but its gradient is not: its checkpoint is not
    written (the updated parameters are NaN), the step-2 one stays."""
    config = ml_collections.ConfigDict(dict(axis_rules=parallel.DEFAULT_RULES, seed=0, log_every_steps=5,
                                            eval_every_steps=100, checkpoint_every_steps=2, keep_checkpoints=5))
    stage = types.SimpleNamespace(init_lr=0.1, lr=0.1, end_lr=0.1, warmup_steps=1, num_steps=6, b1=0.9, b2=0.999,
                                  weight_decay=0.0)
    rows = grain.MapDataset.range(1, 100).map(lambda i: {"x": np.full((2, 4), i, np.float32)})
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    preemption, writer = coordination.Preemption(), reporting.MetricsWriter(str(tmp_path))
    try:
        with pytest.raises(FloatingPointError, match="step 4: non-finite"):
            loop.run_stage(name="s", model=_Line(), trainable=nnx.Param, loss_fn=_nan_gradient_at_step_4,
                           stage=stage, config=config, mesh=mesh, train_iter=iter(rows.to_iter_dataset()),
                           evaluate=lambda model, step: None, writer=writer, preemption=preemption,
                           checkpoint_dir=str(tmp_path / "ckpt"))
    finally:
        preemption.close()
        writer.close()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["2"]
    saved = saved_as_numpy(str(tmp_path / "ckpt" / "2" / "state"))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(saved))


def test_a_checkpoint_without_the_data_position_says_so(tmp_path, caplog):
    """A checkpoint whose data/ folder is missing warned that the iterator's state was
    "written by other processes ()", naming none."""
    state = {"w": jnp.ones((2,))}
    rows = iter(grain.MapDataset.range(10).to_iter_dataset())
    checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=1)
    try:
        checkpointer.save(1, state, rows, {})
        checkpointer.wait()
        shutil.rmtree(tmp_path / "1" / "data")
        with caplog.at_level("WARNING"):
            checkpointer.restore(1, jax.tree.map(jnp.zeros_like, state), rows)
    finally:
        checkpointer.close()
    assert re.search(r"step 1: the data iterator's state was not saved: the train data starts afresh", caplog.text)


def test_a_warmup_as_long_as_the_stage_is_warned_about(caplog):
    """A preset's warm-up left longer than a shortened stage: the warning names the
    stage and gives the last step's learning rate, below `lr`."""
    stage = types.SimpleNamespace(init_lr=0.0, lr=1.0, end_lr=0.1, warmup_steps=100, num_steps=50)
    with caplog.at_level("WARNING"):
        optim.warn_if_warmup_outlasts("stage1", stage)
    assert re.search(r"stage1: warmup_steps 100 is not below num_steps 50.* ends at 0.49\b", caplog.text)
    caplog.clear()
    with caplog.at_level("WARNING"):
        optim.warn_if_warmup_outlasts("stage1", types.SimpleNamespace(**{**vars(stage), "warmup_steps": 49}))
    assert "warmup_steps" not in caplog.text


def _lavis_cosine(stage, epoch: int, num_epochs: int) -> float:
    return stage.end_lr + (stage.lr - stage.end_lr) * 0.5 * (1 + np.cos(np.pi * epoch / num_epochs))


def test_seed1_learning_rate_follows_lavis_epochs():
    """seed1's schedule is LAVIS's linear_warmup_cosine_lr over SEED's 5000-step epochs:
    warm-up from init_lr over 2000 steps, lr to the end of epoch 0, then each epoch the
    cosine's value at that epoch (stage I over its 10 epochs, stage II over the 500 its
    yaml sets). A smooth cosine had decayed before epoch 0 ended and reached end_lr."""
    config = get_config("seed1")
    s1, s2 = config.stage1, config.stage2
    lr1, lr2 = optim.make_schedule(s1), optim.make_schedule(s2)
    np.testing.assert_allclose([float(lr1(0)), float(lr1(1000))], [s1.init_lr, (s1.init_lr + s1.lr) / 2], rtol=1e-5)
    np.testing.assert_allclose([float(lr1(2000)), float(lr1(4999))], [s1.lr, s1.lr], rtol=1e-5)
    for step, epoch in ((5000, 1), (9999, 1), (25_000, 5), (49_999, 9)):
        np.testing.assert_allclose(float(lr1(step)), _lavis_cosine(s1, epoch, 10), rtol=1e-5)
    np.testing.assert_allclose(float(lr2(49_999)), _lavis_cosine(s2, 9, 500), rtol=1e-5)


def test_steps_past_the_lavis_epochs_fail_naming_the_fields():
    """seed1 given more stage-I steps than its 10 epochs of 5000 (--config.stage1.num_steps
    raised alone) took the cosine past its last epoch, LAVIS never trains: the learning
    rate rose again, from end_lr back to lr by step 100k. Refused now, before training."""
    config = get_config("seed1")
    config.stage1.num_steps = 60_000
    with pytest.raises(ValueError, match=re.escape(
            "stage1.num_steps 60000 runs past stage1.num_epochs 10 of stage1.steps_per_epoch 5000 (50000 steps)")):
        trainer.check_config(config)
    with pytest.raises(ValueError, match=r"^num_steps 60000 runs past num_epochs 10 "):
        optim.make_schedule(config.stage1)
    for num_epochs in (12, 0):  # enough epochs, or as many as num_steps spans
        config.stage1.num_epochs = num_epochs
        optim.check_schedule(config.stage1, "stage1.")
        lr = optim.make_schedule(config.stage1)
        assert float(lr(59_999)) < float(lr(50_000)) < float(lr(45_000))


@pytest.mark.parametrize("overrides, message", [
    ({"stage1.num_steps": -3}, r"^stage1.num_steps: expected an integer >= 0 \(0: the stage trains no step\), got -3$"),
    ({"stage2.warmup_steps": -1}, r"^stage2.warmup_steps: expected an integer >= 0 \(0: none\), got -1$")])
def test_negative_steps_fail_naming_the_field(tmp_path, overrides, message):
    """`stage1.num_steps=-3` skipped stage I without a word (stage II trained on its random
    start and DONE.json said stage1_steps 0); a negative warm-up started mid-cosine. Both
    are refused before the data is made."""
    with pytest.raises(ValueError, match=message):
        trainer.train(_tiny(**overrides), str(tmp_path))
    assert not os.path.exists(tmp_path / "data")


@pytest.mark.parametrize("name, value, message", [
    ("lr", -1e-3, r"^stage1.lr: expected a number >= 0, got -0.001$"),
    ("end_lr", float("nan"), r"^stage1.end_lr: expected a finite number, got nan$"),
    ("weight_decay", -0.05, r"^stage1.weight_decay: expected a number >= 0, got -0.05$"),
    ("b2", 1.0, r"^stage1.b2: expected AdamW's decay rate in \[0, 1\), got 1.0$"),
    ("init_lr", "1e-5", r"^stage1.init_lr: expected a finite number, got '1e-5'$")])
def test_learning_rates_and_adamw_settings_out_of_range_fail_naming_them(name, value, message):
    """A negative learning rate or weight decay ascended the loss without a word; a b1 or b2
    of 1 zeroes AdamW's bias correction, so every update is NaN. Every trainer checks its
    stages so, before anything runs."""
    stage = ml_collections.ConfigDict({**get_config("tiny").stage1.to_dict(), name: value})
    with pytest.raises(ValueError, match=message):
        optim.check_optimizer(stage, "stage1.")
    optim.check_optimizer(get_config("tiny").stage1, "stage1.")


def test_a_stage_without_steps_per_epoch_decays_smoothly():
    """The demo and tiny presets keep the smooth warm-up cosine they were measured with."""
    for preset in ("demo", "tiny"):
        stage = get_config(preset).stage1
        assert stage.steps_per_epoch == 0
        smooth = optax.warmup_cosine_decay_schedule(stage.init_lr, stage.lr, stage.warmup_steps, stage.num_steps,
                                                    stage.end_lr)
        steps = np.arange(stage.num_steps)
        np.testing.assert_allclose(optim.make_schedule(stage)(steps), smooth(steps), rtol=1e-6)
    with pytest.raises(ValueError, match="steps_per_epoch: expected >= 0"):
        optim.make_schedule(types.SimpleNamespace(**{**get_config("tiny").stage1.to_dict(), "steps_per_epoch": -1}))


def test_the_trainer_example_cleans_captions_as_config_data_says():
    """`data.caption_processor` reaches the examples the tokenizer trainer reads."""
    from seed_jax.data import text

    config = _tiny()
    tok = text.TextTokenizer(text.grammar_wordpiece(["a", "red"]), 8, 0)
    assert trainer.make_example(config, tok, tok, pipeline.SkipCounter()).process_caption is str
    config.data.caption_processor = "blip_caption"
    assert trainer.make_example(config, tok, tok, pipeline.SkipCounter()).process_caption is text.blip_caption


def _fit_line(model, batch, rng):
    return jnp.mean((batch["x"] @ model.w[...] + model.b[...] - 1.0) ** 2), ({}, {})


def _run_line_stage(checkpoint_dir, workdir, *, num_steps=8, evaluate=lambda model, step: None, model=None,
                    skipped=None, loss_fn=_fit_line, stage_index=None, mesh=None, **config):
    """`loop.run_stage` of `loss_fn` (default `_fit_line`) on `model` (default `_Line()`;
    step i's batch is filled with i / 100), logging and evaluating every step,
    checkpointing every 4; returns the model. `skipped` (a SkipCounter) counts a skipped
    record for every third batch read; `stage_index` goes to `loop.run_stage`; `mesh`
    defaults to one device's."""
    config = ml_collections.ConfigDict({**dict(axis_rules=parallel.DEFAULT_RULES, seed=0, log_every_steps=1,
                                               eval_every_steps=1, checkpoint_every_steps=4, keep_checkpoints=5),
                                        **config})
    stage = types.SimpleNamespace(init_lr=0.1, lr=0.1, end_lr=0.01, warmup_steps=1, num_steps=num_steps, b1=0.9,
                                  b2=0.999, weight_decay=0.0)
    skipped = skipped or pipeline.SkipCounter()

    def row(i):
        if i % 3 == 0:
            skipped.add()
        return {"x": np.full((2, 4), i / 100, np.float32)}

    rows = grain.MapDataset.range(1, 100).map(row).to_iter_dataset(grain.ReadOptions(num_threads=0))
    mesh = mesh or parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    preemption, writer, model = coordination.Preemption(), reporting.MetricsWriter(str(workdir)), model or _Line()
    try:
        loop.run_stage(name="s", model=model, trainable=nnx.Param, loss_fn=loss_fn, stage=stage, config=config,
                       mesh=mesh, train_iter=iter(rows), evaluate=evaluate, writer=writer, preemption=preemption,
                       checkpoint_dir=str(checkpoint_dir), counters={"data/skipped_records": skipped},
                       stage_index=stage_index)
    finally:
        preemption.close()
        writer.close()
    return model


def _fit_line_reporting_a_draw(model, batch, rng):
    """`_fit_line`, with a number drawn from the step's loss key among its metrics."""
    loss, (metrics, aux) = _fit_line(model, batch, rng)
    return loss, ({**metrics, "draw": jax.random.uniform(rng)}, aux)


def _train_draws(workdir) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [line["draw"] for line in map(json.loads, f) if line["split"] == "train"]


def test_each_stage_index_draws_its_own_keys_and_a_resumed_stage_those_of_a_straight_one(tmp_path):
    """SEED-OPT's phases train one model with one dropout: with the step folded into the
    seed alone, their step k drew the same masks. A stage index is folded in: each index
    draws its own keys, a stage stopped at step 4 and resumed draws those of a straight
    run, and a stage without one draws the seed's keys as before (the tokenizer's
    stages and the decoder's: their demos' figures stay)."""
    for index in (0, 1):
        _run_line_stage(tmp_path / f"ckpt{index}", tmp_path / f"index{index}", loss_fn=_fit_line_reporting_a_draw,
                        stage_index=index)
    first, second = _train_draws(tmp_path / "index0"), _train_draws(tmp_path / "index1")
    assert len(first) == len(set(first)) == 8 and not set(first) & set(second)
    for num_steps in (4, 8):
        _run_line_stage(tmp_path / "ckpt_resumed", tmp_path / "resumed", num_steps=num_steps,
                        loss_fn=_fit_line_reporting_a_draw, stage_index=0)
    assert _train_draws(tmp_path / "resumed") == first
    _run_line_stage(tmp_path / "ckpt_seed", tmp_path / "seed", loss_fn=_fit_line_reporting_a_draw)
    seed_keys = [jax.random.split(jax.random.fold_in(jax.random.key(0), step))[0] for step in range(8)]
    np.testing.assert_array_equal(np.float32(_train_draws(tmp_path / "seed")),
                                  [jax.random.uniform(key) for key in seed_keys])


def test_a_stage_given_more_steps_after_a_later_stage_started_is_refused(tmp_path):
    """Raising stage I's num_steps after stage II had checkpoints: stage II would resume
    from them as they are, the extra stage-I training dropped or mismatched."""
    root = tmp_path / "checkpoints"
    _run_line_stage(root / "first", tmp_path / "first", num_steps=4)
    stages = [("first", "stage1", 4), ("second", "stage2", 4)]
    checkpointing.check_stage_order(str(root), stages)  # nothing yet from the second stage
    _run_line_stage(root / "second", tmp_path / "second", num_steps=4)
    checkpointing.check_stage_order(str(root), stages)  # both done: a rerun
    checkpointing.check_stage_order(str(root), [stages[0], ("second", "stage2", 8)])  # the last stage trains on
    with pytest.raises(ValueError, match=r"stage1.num_steps 8: first would train on from step 4, but the later "
                                         r"stages' checkpoints \[.*second'\]"):
        checkpointing.check_stage_order(str(root), [("first", "stage1", 8), stages[1]])
    shutil.rmtree(root / "first")  # e.g. removed to free space: stage I would train again from scratch
    with pytest.raises(ValueError, match=r"stage1.num_steps 4: first has no checkpoint and would train from step 0, "
                                         r"but the later stages' checkpoints \[.*second'\]") as refused:
        checkpointing.check_stage_order(str(root), stages)
    assert "keep stage1.num_steps at 0" not in str(refused.value)  # no stage has 0 steps


def test_a_run_given_another_model_is_refused_for_it_before_its_stages_steps(tmp_path):
    """The demo preset in a finished tiny run's workdir was refused for its stage-I steps
    first, proposing --config.stage1.num_steps=4, with which it was then refused for its
    model; the refusal for the settings that define the run comes first now."""
    workdir = tmp_path / "wd"
    run_config.write(str(workdir), _tiny(), trainer.RUN_DEFINING, trainer.RUN_PATHS)
    for name in ("stage1", "stage2"):
        _run_line_stage(workdir / "checkpoints" / name, tmp_path / name, num_steps=4)
    with pytest.raises(ValueError, match=r"^workdir .*: its checkpoints were trained with other settings than this "
                                         r"run's \(.*model\.num_codes: 64 -> 1024"):
        trainer.train(get_config("demo"), str(workdir))


def _tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """tag -> (step, value) of the scalars TensorBoard shows of the run `run_dir`: its
    event files read in name order, each SessionLog START hiding the events read before
    it from its step on (TensorBoard's purge of a restarted run's orphaned events)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(run_dir)):
        with open(os.path.join(run_dir, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):  # TFRecords: uint64 length, uint32 crc, the event, uint32 crc
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 16 + length
            if event.session_log.status == SessionLog.START:
                scalars = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in scalars.items()}
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_a_run_resumed_after_a_crash_logs_each_step_once(tmp_path, monkeypatch):
    """A crash at step 6 (checkpoint at 4) then a resumed run: steps 5 and 6 are in
    metrics.jsonl once, from the resumed run, which ends where a straight run does and
    counts the skipped records from the start. TensorBoard shows them once too (the
    crashed run's are purged), in a run of the stage's own, tb/s."""
    class CrashAtRow6(pipeline.SkipCounter):  # rows 3, 6, ... count a skip as they are read
        def add(self, n=1, why=""):
            if self.count == 1:
                raise RuntimeError("crash")
            super().add(n, why)

    # each run's event file named apart, as runs a second or more apart are
    runs = itertools.count()
    monkeypatch.setattr(event_file_writer, "socket", types.SimpleNamespace(gethostname=lambda: f"run{next(runs)}"))
    with pytest.raises(RuntimeError, match="crash"):  # reading step 6's batch
        _run_line_stage(tmp_path / "ckpt", tmp_path, skipped=CrashAtRow6(), eval_every_steps=loop.AT_STAGE_END)
    assert os.listdir(tmp_path / "ckpt") == ["4"]
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 6))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "sta')  # a line cut short by a kill
    counted_before_resuming = pipeline.SkipCounter()
    counted_before_resuming.add(5)  # e.g. while reading the eval split: the checkpoint's count holds those
    resumed = _run_line_stage(tmp_path / "ckpt", tmp_path, skipped=counted_before_resuming)
    with open(tmp_path / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [line["step"] for line in lines] == list(range(1, 9))
    straight = _run_line_stage(tmp_path / "straight", tmp_path / "straight")
    np.testing.assert_array_equal(resumed.w[...], straight.w[...])
    # the skipped records of the run, not of the resumed part alone
    assert [line["data/skipped_records"] for line in lines] == [i // 3 for i in range(1, 9)]
    assert os.listdir(tmp_path / "tb") == ["s"] and len(os.listdir(tmp_path / "tb" / "s")) == 2
    shown = _tensorboard_scalars(tmp_path / "tb" / "s")
    for key in ("loss", "data/skipped_records"):
        assert shown[f"train/{key}"] == [(line["step"], pytest.approx(line[key])) for line in lines]


def test_a_run_killed_before_the_newline_of_its_last_line_resumes_on_the_next_line(tmp_path):
    """A kill after a whole JSON line but before its newline: the resumed run's first
    line was appended to it, one line neither could be read from."""
    def crash_at_4(model, step):
        if step == 4:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        _run_line_stage(tmp_path / "ckpt", tmp_path, evaluate=crash_at_4)
    with open(tmp_path / "metrics.jsonl") as f:
        written = f.read()
    assert written.endswith('"data/skipped_records": 1.0}\n')  # step 4's line, last
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(written[:-1])
    _run_line_stage(tmp_path / "ckpt", tmp_path)
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 9))


def test_a_damaged_checkpoint_names_itself_and_the_one_removing_it_resumes_from(tmp_path):
    """A latest checkpoint that orbax could not read failed with orbax's error alone (here
    a JSONDecodeError naming no file); removing it, as the error now says, resumes from
    the one before, to the result of a straight run."""
    def crash_at_4(model, step):
        if step == 4:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        _run_line_stage(tmp_path / "ckpt", tmp_path, evaluate=crash_at_4)
    (tmp_path / "ckpt" / "4" / "state" / "_METADATA").write_text("{cut short")
    with pytest.raises(RuntimeError, match=r"ckpt/4: the checkpoint the run resumes from could not be read "
                                           r"\(JSONDecodeError: Expecting property name .*\); if it is damaged, remove "
                                           r"that folder and the stage resumes from its checkpoint of step 3$"):
        _run_line_stage(tmp_path / "ckpt", tmp_path)
    shutil.rmtree(tmp_path / "ckpt" / "4")
    resumed = _run_line_stage(tmp_path / "ckpt", tmp_path)
    straight = _run_line_stage(tmp_path / "straight", tmp_path / "straight")
    np.testing.assert_array_equal(resumed.w[...], straight.w[...])


def test_a_checkpoint_of_cut_short_array_data_names_the_array_and_file(tmp_path):
    """orbax wraps tensorstore's read error (naming the array and the file) in an Exception
    naming neither, and the error named that one, "above": behind, in a train state of
    many arrays, the "Event loop is closed" tracebacks of the reads orbax left in flight.
    It now names tensorstore's."""
    # w: too large, compressed, to be inlined in OCDBT's tree
    state = {"w": jax.random.normal(jax.random.key(0), (1000,)), "b": jnp.zeros((2,))}
    rows = iter(grain.MapDataset.range(10).to_iter_dataset())
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "ckpt"), keep=2)
    try:
        checkpointer.save(1, state, rows, {})
        checkpointer.save(2, state, rows, {})
        checkpointer.wait()
    finally:
        checkpointer.close()
    for data in (tmp_path / "ckpt" / "2" / "state").glob("ocdbt.process_*/d/*"):
        os.truncate(data, 10)
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "ckpt"), keep=2)
    try:
        with pytest.raises(RuntimeError, match=r"ckpt/2: the checkpoint the run resumes from could not be read "
                                               r"\(ValueError: OUT_OF_RANGE: Error reading \"w/0\" in OCDBT database at "
                                               r"local file \"\S+/ckpt/2/state/\": .*\); if it is damaged, remove that "
                                               r"folder and the stage resumes from its checkpoint of step 1$"):
            checkpointer.restore(2, jax.tree.map(jnp.zeros_like, state), rows)
    finally:
        checkpointer.close()


def test_a_run_preempted_between_log_steps_logs_the_lines_of_a_straight_run(tmp_path, monkeypatch):
    """Preempted at step 5 (lines every 3 steps): the metrics of steps 4 and 5 were lost,
    and the resumed run's step-6 line averaged step 6 alone. The checkpoint now saves
    them, so each line is a straight run's (all but its steps/s)."""
    def train_lines(workdir):
        with open(workdir / "metrics.jsonl") as f:
            return [{k: v for k, v in json.loads(line).items() if k != "steps_per_sec"} for line in f]

    settings = dict(log_every_steps=3, eval_every_steps=loop.AT_STAGE_END)
    _run_line_stage(tmp_path / "straight" / "ckpt", tmp_path / "straight", **settings)
    monkeypatch.setattr(coordination.Preemption, "requested", lambda self, sync: self._steps.pop(0))
    monkeypatch.setattr(coordination.Preemption, "_steps", [False] * 4 + [True], raising=False)
    _run_line_stage(tmp_path / "ckpt", tmp_path, **settings)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["4", "5"]
    monkeypatch.setattr(coordination.Preemption, "_steps", [False] * 3, raising=False)
    _run_line_stage(tmp_path / "ckpt", tmp_path, **settings)
    assert [line["step"] for line in train_lines(tmp_path)] == [3, 6, 8]
    assert train_lines(tmp_path) == train_lines(tmp_path / "straight")


def test_a_crash_while_evaluating_the_last_step_loses_no_training(tmp_path):
    """The last step is saved before it is evaluated: a crash in that evaluation costs
    the evaluation alone, which the resumed run does first and only once."""
    def crash_at_8(model, step):
        if step == 8:
            raise RuntimeError("crash")
        return {"w0": float(model.w[0])}

    with pytest.raises(RuntimeError, match="crash"):
        _run_line_stage(tmp_path / "ckpt", tmp_path, evaluate=crash_at_8)
    assert "8" in os.listdir(tmp_path / "ckpt")
    evaluated = []

    def record(model, step):
        evaluated.append(step)
        return {"w0": float(model.w[0])}

    resumed = _run_line_stage(tmp_path / "ckpt", tmp_path, evaluate=record)
    assert evaluated == [8]
    with open(tmp_path / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    for split in ("train", "eval"):
        assert [line["step"] for line in lines if line["split"] == split] == list(range(1, 9))
    assert lines[-1]["w0"] == pytest.approx(float(resumed.w[0]))
    _run_line_stage(tmp_path / "ckpt", tmp_path, evaluate=record)
    assert evaluated == [8]  # evaluated already: not again


def test_a_crash_while_evaluating_between_checkpoints_costs_the_evaluation_alone(tmp_path, caplog):
    """An evaluation step that is no checkpoint step (eval every 3 steps, checkpoints
    every 4) was evaluated without a checkpoint of it: a crash in that evaluation sent
    the resumed run back to the last checkpoint (here none: step 0), training again the
    steps since. The step is now saved before it is evaluated, as a stage's last step is."""
    def crash_at_3(model, step):
        if step == 3:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        _run_line_stage(tmp_path / "ckpt", tmp_path, evaluate=crash_at_3, eval_every_steps=3)
    assert os.listdir(tmp_path / "ckpt") == ["3"]
    evaluated = []
    with caplog.at_level("INFO"):
        _run_line_stage(tmp_path / "ckpt", tmp_path, evaluate=lambda model, step: evaluated.append(step),
                        eval_every_steps=3)
    assert "s: resumed from step 3" in caplog.text
    assert evaluated == [3, 6, 8]
    assert sorted(os.listdir(tmp_path / "ckpt"), key=int) == ["3", "4", "6", "8"]


@pytest.mark.parametrize("every, evaluated", [(loop.AT_STAGE_END, [8]), (3, [3, 6, 8]), (1000, [8])])
def test_a_stage_evaluates_and_saves_its_last_step_whatever_the_interval(tmp_path, every, evaluated):
    """An interval longer than the stage (`num_steps` lowered on the command line) still
    evaluates and saves its last step; AT_STAGE_END evaluates there only. Each step
    evaluated is saved, checkpoint interval or not."""
    steps = []
    _run_line_stage(tmp_path / "ckpt", tmp_path, evaluate=lambda model, step: steps.append(step),
                    eval_every_steps=every, checkpoint_every_steps=1000)
    assert steps == evaluated and sorted(os.listdir(tmp_path / "ckpt"), key=int) == [str(s) for s in evaluated]


@pytest.mark.parametrize("trainer_name, stages", [("tokenizer", ("stage1", "stage2")), ("decoder", ("train",)),
                                                  ("seed_opt", ("phase1", "phase2"))])
def test_demo_configs_evaluate_at_the_end_of_each_stage_given_more_steps(trainer_name, stages):
    """The demo configs meant to evaluate at the end of each stage fixed eval_every_steps
    from their step counts: given more steps (`--config.train.num_steps=4500`) the decoder
    also evaluated at steps 1500 and 3000, a SEED-OPT phase every 500 steps."""
    import importlib

    config = importlib.import_module(f"configs.{trainer_name}").get_config("demo")
    for name in stages:
        stage = config[name]
        stage.num_steps *= 3
        assert [s for s in range(1, stage.num_steps + 1) if loop.evaluates_at(s, stage, config)] == [stage.num_steps]


def test_a_run_resumed_on_another_number_of_processes_restarts_its_data(tmp_path, caplog):
    """The data iterator's state is saved per process (grain: process_I-of-N.json): a
    checkpoint of two processes resumed on one (or the reverse) raised that its file
    does not exist, even where the stage was finished. The train state and counts are
    restored; the data starts afresh (with a warning, unless the stage was finished)."""
    _run_line_stage(tmp_path / "ckpt", tmp_path, num_steps=4)
    data = tmp_path / "ckpt" / "4" / "data"
    for i in range(2):  # as two processes write it
        (data / f"process_{i}-of-2.json").write_text((data / "process_0-of-1.json").read_text())
    (data / "process_0-of-1.json").unlink()
    with caplog.at_level("INFO"):
        _run_line_stage(tmp_path / "ckpt", tmp_path, num_steps=4)  # finished: nothing to do
    assert "s: resumed from step 4" in caplog.text
    assert "starts afresh" not in caplog.text  # a finished stage reads no data: no warning
    caplog.clear()
    with caplog.at_level("INFO"):
        _run_line_stage(tmp_path / "ckpt", tmp_path, num_steps=8)
    assert "s: resumed from step 4" in caplog.text
    assert "(process_0-of-1.json): the train data starts afresh" in caplog.text
    with open(tmp_path / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [line["step"] for line in lines] == list(range(1, 9))
    # the run's count carried on (row 3 at step 3), then rows 1, 2, 3 again: row 3 at step 7
    assert [line["data/skipped_records"] for line in lines[3:]] == [1, 1, 1, 2, 2]


class _ShardedLine(nnx.Module):
    """`_Line` with 8 outputs, its parameters named for sharding (over fsdp and tensor)."""

    def __init__(self):
        self.w = nnx.Param(jnp.full((4, 8), 0.1) + jnp.arange(8) / 100, out_sharding=("embed", "mlp"),
                           eager_sharding=False)
        self.b = nnx.Param(jnp.zeros((8,)), out_sharding=("mlp",), eager_sharding=False)


def _mesh_of(axes: dict[str, int]):
    """A mesh of `axes` over the first devices it needs."""
    return parallel.make_mesh(axes, devices=jax.devices()[:int(np.prod(list(axes.values())))])


@pytest.mark.parametrize("before, after", [({"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 4}),
                                           ({"data": 1}, {"data": 2, "fsdp": 2, "tensor": 2})])
def test_a_run_resumed_on_another_mesh_restores_its_state_and_trains_on(tmp_path, monkeypatch, before, after):
    """Preempted on one mesh and resumed on another (8 devices then 4, 1 then 8): the
    parameters come back as saved, split as the new mesh splits them, the data where it
    stopped, and training ends where a straight run on the first mesh does (float32
    reduction order aside)."""
    straight = _run_line_stage(tmp_path / "straight", tmp_path / "straight", model=_ShardedLine(),
                               mesh=_mesh_of(before))
    calls = {"n": 0}

    def preempt_at_step_3(self, sync):
        calls["n"] += 1
        return calls["n"] == 3

    monkeypatch.setattr(coordination.Preemption, "requested", preempt_at_step_3)
    checkpoints = tmp_path / "checkpoints" / "s"
    _run_line_stage(checkpoints, tmp_path, model=_ShardedLine(), mesh=_mesh_of(before))
    monkeypatch.setattr(coordination.Preemption, "requested", lambda self, sync: False)
    saved = checkpoint_params(str(tmp_path), "s", module=None)
    restored = {}

    def record_step_3(model, step):  # evaluated first: the stopped run did not evaluate it
        if step == 3:  # as numpy: the next step donates the arrays
            restored.update({name: (np.asarray(var[...]), var.get_value().sharding)
                             for name, var in (("w", model.w), ("b", model.b))})

    resumed = _run_line_stage(checkpoints, tmp_path, model=_ShardedLine(), mesh=_mesh_of(after),
                              evaluate=record_step_3)
    assert restored.keys() == {"w", "b"}
    for name, (value, sharding) in restored.items():
        np.testing.assert_array_equal(value, saved[name], err_msg=name)
        assert len(sharding.device_set) == np.prod(list(after.values())), name
    assert restored["w"][1].spec == parallel.logical_to_mesh(("embed", "mlp"), (4, 8), _mesh_of(after),
                                                             parallel.DEFAULT_RULES)
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f if '"train"' in line] == list(range(1, 9))
    for name in ("w", "b"):
        np.testing.assert_allclose(getattr(resumed, name)[...], getattr(straight, name)[...], rtol=1e-5, atol=1e-7,
                                   err_msg=name)


def test_a_resumed_run_frees_the_initial_state_its_checkpoint_replaces(tmp_path, monkeypatch):
    """A resumed stage built its initial train state (parameters and optimizer state),
    then trained on the restored one: no step donated the initial one, which the stage
    set-up still held, so it stayed on the devices next to the trained state for the
    whole run (a run that fit from scratch could run out of memory when resumed, e.g.
    on fewer devices). It is freed before restoring."""
    _run_line_stage(tmp_path / "ckpt", tmp_path, num_steps=4)
    initial: list[weakref.ref] = []
    prepare = loop.prepare_stage

    def remembering_the_initial_state(*args, **kwargs):
        setup = prepare(*args, **kwargs)
        initial.extend(weakref.ref(x) for x in jax.tree.leaves(setup.state))
        return setup

    held_while_training = []

    def count_held(model, step):
        gc.collect()
        held_while_training.append(sum(ref() is not None for ref in initial))

    monkeypatch.setattr(loop, "prepare_stage", remembering_the_initial_state)
    _run_line_stage(tmp_path / "ckpt", tmp_path, num_steps=6, evaluate=count_held)
    assert len(initial) > 2 and len(held_while_training) >= 2 and not any(held_while_training)


class _WideLine(nnx.Module):
    """A line of (517, 3) weights (a shape nothing else here has) and a frozen offset."""

    def __init__(self):
        self.w = nnx.Param(jnp.full((517, 3), 0.1))
        self.offset = nnx.Variable(jnp.ones((3,)))


def _bytes_on_first_device(shape) -> int:
    """The bytes the live arrays of `shape` hold on the first device."""
    gc.collect()
    return sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.live_arrays()
               if x.shape == shape and not x.is_deleted() and jax.devices()[0] in x.sharding.device_set)


def test_a_stage_holds_its_trainable_parameters_once():
    """The stage's initial train state copied the model's trainable parameters (on a mesh
    of several devices, where jit does not pass inputs through), and the model kept its
    copy for the whole stage, until the first evaluation: the parameters took twice their
    bytes beside the optimizer state (87 MB more per device for seed1's stage I on
    gpu8). The model now holds the train state's arrays: after a step, the parameters
    and AdamW's two moments alone are held."""
    mesh = parallel.make_mesh({"data": jax.device_count()})
    model = _WideLine()
    nnx.update(model, jax.device_put(nnx.state(model), parallel.replicated(mesh)))  # as the trainers build it
    stage = types.SimpleNamespace(init_lr=0.1, lr=0.1, end_lr=0.1, warmup_steps=1, num_steps=2, b1=0.9, b2=0.999,
                                  weight_decay=0.0)
    config = ml_collections.ConfigDict(dict(axis_rules=parallel.DEFAULT_RULES, seed=0))

    def loss_fn(model, batch, rng):
        return jnp.mean((batch["x"] @ model.w[...] - model.offset[...]) ** 2), ({}, {})

    shape, one = (517, 3), 517 * 3 * 4
    assert _bytes_on_first_device(shape) == one  # the model's
    setup = loop.prepare_stage(model, nnx.Param, loss_fn, stage, config, mesh)
    batch = global_batches.global_batch({"x": np.ones((8, 517), np.float32)}, mesh, config.axis_rules)
    state, _ = setup.train_step(setup.state, setup.frozen, batch)
    setup.state = None
    assert _bytes_on_first_device(shape) == 3 * one  # the parameters, AdamW's mu and nu
    nnx.update(model, state["params"])
    np.testing.assert_array_less(model.w[...], 0.1)  # the model reads the trained state


@pytest.mark.parametrize("setting", loop.LOOP_SETTINGS)
def test_loop_settings_out_of_range_are_refused_naming_them(tmp_path, setting):
    """An interval of 0 failed at the first step, after compiling, as a bare 'integer
    modulo by zero' (`eval_every_steps` 0 is now AT_STAGE_END); with keep_checkpoints 0
    orbax deleted each checkpoint as it was saved, so a preempted run started again from
    step 0. Each is refused by the loop before it trains, and by the trainer before the
    data is made."""
    least = loop.AT_STAGE_END if setting == "eval_every_steps" else 1
    message = rf"{setting}: expected an integer >= {least}.*, got {least - 1}"
    with pytest.raises(ValueError, match=message):
        _run_line_stage(tmp_path / "ckpt", tmp_path, **{setting: least - 1})
    assert not os.path.exists(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=message):
        trainer.train(_tiny(**{setting: least - 1}), str(tmp_path / "wd"))
    assert not os.path.exists(tmp_path / "wd")


@pytest.mark.parametrize("seed", [-1, 2**32 - 1])
def test_a_seed_out_of_range_fails_naming_it(tmp_path, seed):
    """`--config.seed=-1` failed as grain's traceback once the model was built, with
    config.json written; stage II's data shuffle with seed + 1, so 2**32 - 1 failed once stage I had trained."""
    with pytest.raises(ValueError, match=rf"^seed: expected an integer in \[0, 2\*\*32 - 1\) .*got {seed}$"):
        trainer.train(_tiny(seed=seed), str(tmp_path))
    assert not os.path.exists(tmp_path / "config.json")


def test_resuming_with_another_model_config_names_the_arrays_that_differ(tmp_path):
    _run_line_stage(tmp_path / "ckpt", tmp_path, num_steps=4)
    wider = _Line()
    wider.w = nnx.Param(jnp.full((5,), 0.1))
    with pytest.raises(ValueError, match=r"(?s)step 4: .*params\.w\.value: expected \(5,\), got \(4,\)") as error:
        _run_line_stage(tmp_path / "ckpt", tmp_path, num_steps=8, model=wider)
    assert "resume with the config that wrote it, or train into a new workdir" in str(error.value)
    assert "export" not in str(error.value)


def test_stage2_reconstructs_through_its_own_head_and_distils_through_blocks_text():
    """As SEED's training code: L_recon through decode_task_layer + pos_embed -> blocks,
    L_distill through decode_task_layer + pos_embed_text -> blocks_text -> reverse
    Q-Former; the two heads share only decode_task_layer (and what feeds it)."""
    config = _tiny()
    _, _, create = trainer.build_model(config)
    model = create()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = _batch(config, 0)

    def gradient_norms(part):
        def loss(params):
            losses, _ = trainer.stage2_losses(nnx.merge(graphdef, params, rest), batch["image"], batch["clip_ids"])
            return losses[part]

        grads = weights.flat_params(nnx.merge(graphdef, jax.grad(loss)(params), rest))
        modules = ("blocks", "pos_embed", "blocks_text", "pos_embed_text", "decode_task_layer", "reverse_qformer")
        return {m: sum(float(np.sum(np.square(g))) for k, g in grads.items() if k.split(".")[1] == m)
                for m in modules}

    recon, distill = gradient_norms("recon_loss"), gradient_norms("distill_loss")
    assert recon["blocks"] > 0 and recon["pos_embed"] > 0 and recon["decode_task_layer"] > 0
    assert recon["blocks_text"] == recon["pos_embed_text"] == recon["reverse_qformer"] == 0
    assert distill["blocks_text"] > 0 and distill["pos_embed_text"] > 0 and distill["decode_task_layer"] > 0
    assert distill["blocks"] == distill["pos_embed"] == 0


def test_stage2_quantises_causal_embeddings_under_the_frozen_qformers_dropout():
    """SEED's stage II runs its frozen causal Q-Former in train mode: the embeddings it
    quantises and reconstructs carry the Q-Former's dropout (0.1 for seed1); without a
    key (evaluation) and at dropout 0 (the demo) they do not."""
    config = _tiny(**{"model.qformer.dropout": 0.1})
    _, _, create = trainer.build_model(config)
    model = create()
    batch = _batch(config, 0)
    rng = jax.random.key(3)
    tok = model.tokenizer

    def quant_input(causal):
        return np.asarray(tok.encode_task_layer(causal.astype(jnp.float32)))

    _, aux = trainer.stage2_losses(model, batch["image"], batch["clip_ids"], rng)
    with_dropout = tok.causal_embeddings(batch["image"], rng=jax.random.split(rng)[0])
    np.testing.assert_allclose(aux["quant_input"], quant_input(with_dropout), rtol=1e-6, atol=1e-6)
    without = quant_input(tok.causal_embeddings(batch["image"]))
    assert np.max(np.abs(aux["quant_input"] - without)) > 1e-2
    _, aux = trainer.stage2_losses(model, batch["image"], batch["clip_ids"])
    np.testing.assert_allclose(aux["quant_input"], without, rtol=1e-6, atol=1e-6)


def test_a_bad_dtype_fails_before_the_data_is_made(tmp_path):
    """An unknown `dtype` was a bare KeyError, once the shapes world was generated; a
    negative `data.num_threads` or `data.prefetch` was grain's error once it was read."""
    config = get_config("tiny")
    config.dtype = "bf16"
    with pytest.raises(ValueError, match=r"dtype: expected one of \['bfloat16', 'float32'\], got 'bf16'"):
        trainer.train(config, str(tmp_path))
    config.dtype = "float32"
    for name in ("num_threads", "prefetch"):
        config.data[name] = -1
        with pytest.raises(ValueError, match=rf"^data\.{name}: expected an integer >= 0, got -1"):
            trainer.train(config, str(tmp_path))
        config.data[name] = 0  # grain's bound: 0 threads read in the loop's thread, 0 prefetch reads none ahead
    loop.check_read_options(config.data)
    assert not os.path.exists(tmp_path / "data")


@pytest.mark.parametrize("trainer_name", ["decoder", "seed_opt"])
def test_a_preempted_tokenizer_run_under_another_trainer_returns_preempted(tmp_path, monkeypatch, trainer_name):
    """The decoder and SEED-OPT train their tokenizer first (`ensure_trained`): its
    preemption raised a RuntimeError (exit 1), not the False (exit 0) of a preempted run."""
    import importlib

    module = importlib.import_module(f"seed_jax.trainers.{trainer_name}")
    config = importlib.import_module(f"configs.{trainer_name}").get_config("tiny")
    monkeypatch.setattr(trainer, "train", lambda config, workdir, prefix="": False)  # SIGTERM while the tokenizer trains
    assert module.train(config, str(tmp_path)) is False
    assert not os.path.exists(tmp_path / "DONE.json")


# A nested tokenizer setting that fails a check, and the start of the message naming it,
# with "{p}" where the field names start: the trainer's "tokenizer." (its config's field).
NESTED_CHECKS = [
    ("stage2.trainable", (*STAGE2_TRAINABLE, "nope"), r"^{p}stage2\.trainable: \['nope'\] are not modules"),
    ("stage2.trainable", ("nope",), r"^{p}stage2\.restart_unused_codes_every=\d+ .* is not in {p}stage2\.trainable "),
    ("data.train_dir", "/shards", r"^{p}data\.train_dir='/shards': {p}data\.source is 'synthetic' .*; "
                                  r"add --config\.{p}data\.source=array_record "),
    ("data.crop_scale", (0.9,), r"^{p}data\.crop_scale: expected .*\(e\.g\. --config\.{p}data\.crop_scale="),
    ("mesh.data", 3, r"^{p}mesh: axis sizes "),
    ("eval.batch_size", 3, r"^{p}eval\.batch_size: 3 does not divide by \d"),
    ("dtype", "bf16", r"^{p}dtype: expected one of"),
    ("keep_checkpoints", 0, r"^{p}keep_checkpoints: expected an integer >= 1"),
    ("loss_weights.vq", -1.0, r"^{p}loss_weights\.vq: expected a finite number >= 0"),
    ("model.generation_width", 24, r"^{p}model\.reverse_qformer\.num_queries, {p}model\.generation_width \(77, 24\): "
                                   r"expected .*, {p}clip_text\.max_length, {p}clip_text\.width \(77, 16\)"),
]


@pytest.mark.parametrize("trainer_name", ["decoder", "seed_opt"])
@pytest.mark.parametrize("key, value, message", NESTED_CHECKS, ids=[f"{k}={v}" for k, v, _ in NESTED_CHECKS])
def test_a_nested_tokenizer_setting_that_cannot_run_is_named_as_the_trainer_names_it(
        tmp_path, trainer_name, key, value, message):
    """The decoder and SEED-OPT train their tokenizer from `config.tokenizer`: its checks
    named `stage2.trainable`, which their command line does not have, and offered
    `--config.data.source=...`; the fields are now named `tokenizer.stage2.trainable`,
    as `--config.tokenizer.stage2.trainable` sets them. The tokenizer trainer on its own
    names them as before."""
    import importlib

    module = importlib.import_module(f"seed_jax.trainers.{trainer_name}")
    config = importlib.import_module(f"configs.{trainer_name}").get_config("tiny")
    config.tokenizer.update_from_flattened_dict({key: value})
    with pytest.raises(command_line.ConfigError, match=message.format(p=re.escape("tokenizer."))):
        module.train(config, str(tmp_path))
    alone = config.tokenizer
    with pytest.raises(command_line.ConfigError, match=message.format(p="")):
        trainer.train(alone, str(tmp_path / "alone"))


def _save_a_checkpoint(checkpoint_dir: str, step: int) -> None:
    with ocp.CheckpointManager(checkpoint_dir) as manager:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"x": np.zeros(2)})))


@pytest.mark.parametrize("trainer_name", ["decoder", "seed_opt"])
def test_an_unfinished_nested_tokenizer_run_refused_names_the_trainers_fields(tmp_path, trainer_name):
    """An unfinished tokenizer run resumed by the decoder or SEED-OPT with other settings
    (or more stage-I steps after stage II began) was refused naming `seed` and offering
    `--config.seed=0`, the decoder's own seed; it now names `tokenizer.seed` and offers
    `--config.tokenizer.seed=0`. Both refusals said "train into a new workdir" without
    the flag that names one, --config.tokenizer_workdir, and the stage-order one named
    the field to keep, not its flag."""
    import importlib

    module = importlib.import_module(f"seed_jax.trainers.{trainer_name}")
    config = importlib.import_module(f"configs.{trainer_name}").get_config("tiny")
    config.tokenizer_workdir = str(tmp_path / "tokenizer")
    trained = config.tokenizer.seed
    run_config.write(config.tokenizer_workdir, config.tokenizer, trainer.RUN_DEFINING, trainer.RUN_PATHS)
    steps = config.tokenizer.stage1.num_steps
    _save_a_checkpoint(os.path.join(config.tokenizer_workdir, "checkpoints", "stage1"), steps)
    config.tokenizer.seed = trained + 1
    refusal = (f"(tokenizer.seed: {trained} -> {trained + 1}); its config.json records what they are and is kept. "
               f"Train into a new workdir (--config.tokenizer_workdir=DIR), or resume with the settings it was trained "
               f"with: "
               f"--config.tokenizer.seed={trained}")
    with pytest.raises(command_line.ConfigError, match=re.escape(refusal)):
        module.train(config, str(tmp_path / "run"))
    config.tokenizer.seed = trained
    _save_a_checkpoint(os.path.join(config.tokenizer_workdir, "checkpoints", "stage2"), 1)
    config.tokenizer.stage1.num_steps = steps + 2
    with pytest.raises(command_line.ConfigError, match=re.escape(
            f"tokenizer.stage1.num_steps {steps + 2}: stage1 would train on from step {steps}")) as error:
        module.train(config, str(tmp_path / "run"))
    assert str(error.value).endswith(f"or keep tokenizer.stage1.num_steps at {steps} (--config.tokenizer.stage1.num_steps="
                                     f"{steps}) (or train into a new workdir: --config.tokenizer_workdir=DIR)")


@pytest.mark.parametrize("trainer_name", ["decoder", "seed_opt"])
def test_a_nested_tokenizer_runs_data_errors_name_the_trainers_fields(tmp_path, trainer_name):
    """A nested tokenizer run (trained first by the decoder or SEED-OPT) with a shard
    folder that holds no shards, an unknown text tokenizer kind or more eval examples
    than its eval split holds was refused naming `data.train_dir`, `data.tokenizer.kind`
    or `eval.num_examples`, the trainer's own fields' names; it now names the flags'
    fields: `tokenizer.data.train_dir`, ... Each was also a traceback; each is now a
    ConfigError, whose message `python -m seed_jax.main` prints alone."""
    import importlib

    module = importlib.import_module(f"seed_jax.trainers.{trainer_name}")
    config = importlib.import_module(f"configs.{trainer_name}").get_config("tiny")
    config.tokenizer_workdir = str(tmp_path / "tokenizer")
    config.tokenizer.data.update(dict(source="array_record", train_dir=str(tmp_path), eval_dir=str(tmp_path)))
    with pytest.raises(command_line.ConfigError, match=r"^tokenizer\.data\.train_dir: no ArrayRecord shards"):
        module.train(config, str(tmp_path / "run"))
    config.tokenizer.data.update(dict(source="synthetic", train_dir="", eval_dir=""))
    config.tokenizer.data.tokenizer.kind = "bogus"
    config.tokenizer_workdir = str(tmp_path / "tokenizer2")
    with pytest.raises(command_line.ConfigError,
                       match=r"^tokenizer\.data\.tokenizer\.kind: expected 'wordpiece_grammar' or"):
        module.train(config, str(tmp_path / "run"))
    config.tokenizer.data.tokenizer.kind = "wordpiece_grammar"
    config.tokenizer.eval.num_examples = config.tokenizer.data.synthetic.num_eval + 1
    with pytest.raises(command_line.ConfigError,
                       match=rf"^tokenizer\.eval\.num_examples: {config.tokenizer.eval.num_examples} "
                             "requested, the eval split has"):
        module.train(config, str(tmp_path / "run"))


@pytest.mark.parametrize("trainer_name", ["decoder", "seed_opt"])
def test_a_reused_tokenizer_run_warns_of_the_nested_settings_it_does_not_take(tmp_path, monkeypatch, caplog,
                                                                             trainer_name):
    """A finished tokenizer run is reused with the settings it was trained with: a
    `--config.tokenizer.*` override of one that defines the run was ignored without a
    word. One warning now lists each that differs (paths compared absolute); the demo's
    defaults agree with the tokenizer demo's run."""
    import importlib

    monkeypatch.chdir(tmp_path)
    config = importlib.import_module(f"configs.{trainer_name}").get_config("demo")
    config.tokenizer_workdir = "tokenizer_run"
    run = get_config("demo")  # the tokenizer demo's run, its CLIP text encoder named relative to the repository
    run.init.clip_text = "exports/clip_text"
    run_config.write(config.tokenizer_workdir, run, trainer.RUN_DEFINING, trainer.RUN_PATHS)
    (tmp_path / config.tokenizer_workdir / "DONE.json").write_text("{}")
    monkeypatch.setattr(trainer, "export_finished_run", lambda directory: (os.path.join(directory, "export"), run))

    def warnings_of_reusing() -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert trainer.ensure_trained(config, str(tmp_path / "run"))[2] is run
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    config.tokenizer.init.clip_text = str(tmp_path / "exports" / "clip_text")  # the same, named absolute
    config.tokenizer.stage2.num_steps += 1  # how long it trains: does not define the run
    assert warnings_of_reusing() == []
    config.tokenizer.data.max_text_length = run.data.max_text_length + 1
    config.tokenizer.seed = run.seed + 1
    [warning] = warnings_of_reusing()
    assert (f"(the run's value -> the given one: tokenizer.data.max_text_length: {run.data.max_text_length} -> "
            f"{run.data.max_text_length + 1}, tokenizer.seed: {run.seed} -> {run.seed + 1})") in warning
    assert "reused with the settings it was trained with" in warning and "--config.tokenizer_workdir=" in warning


def _tokenizer_run_copy(tiny_decoder_run, tmp_path) -> tuple[str, ml_collections.ConfigDict]:
    """A copy of the finished tiny tokenizer run the decoder fixture trained, and its config."""
    from seed_jax import export

    copy = str(tmp_path / "tokenizer")
    shutil.copytree(os.path.join(tiny_decoder_run, "tokenizer"), copy)
    return copy, export.read_workdir_config(copy)


def test_a_finished_run_resumed_with_more_steps_is_unfinished_until_it_has_trained_them(tiny_decoder_run, tmp_path,
                                                                                      monkeypatch):
    """DONE.json stayed when a finished run was resumed with more steps: preempted on the
    way, the run was taken as finished (`ensure_trained`, the evaluators), which exported
    its half-trained checkpoint, again at every call."""
    workdir, config = _tokenizer_run_copy(tiny_decoder_run, tmp_path)
    monkeypatch.setattr(loop, "run_stage", lambda **kwargs: False)  # preempted before any step
    assert trainer.train(config, workdir) is False
    assert os.path.exists(os.path.join(workdir, "DONE.json"))  # nothing more to train: still finished
    config.stage2.num_steps += 2
    assert trainer.train(config, workdir) is False
    assert not os.path.exists(os.path.join(workdir, "DONE.json"))


def test_done_records_the_steps_of_the_checkpoints(tiny_decoder_run, tmp_path):
    """DONE.json named the config's num_steps, also when lowered below the last
    checkpoint, which the run restores as it is."""
    workdir, config = _tokenizer_run_copy(tiny_decoder_run, tmp_path)
    os.remove(os.path.join(workdir, "DONE.json"))
    trained = {name: config[name].num_steps for name in ("stage1", "stage2")}
    config.stage2.num_steps -= 1
    assert trainer.train(config, workdir)
    with open(os.path.join(workdir, "DONE.json")) as f:
        assert json.load(f) == {f"{name}_steps": steps for name, steps in trained.items()}


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero(tmp_path, repo_root):
    workdir = tmp_path / "wd"
    command = [sys.executable, "-m", "seed_jax.main", f"--config={repo_root}/configs/tokenizer.py:tiny",
               f"--workdir={workdir}", "--config.stage1.num_steps=100", "--config.stage2.num_steps=2",
               "--config.checkpoint_every_steps=1000", "--config.log_every_steps=1",
               "--config.eval_every_steps=1000", "--config.mesh.data=1"]
    env = {**os.environ, "PYTHONPATH": repo_root}
    proc = subprocess.Popen(command, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "preempted" in output
    saved = [int(d) for d in os.listdir(workdir / "checkpoints" / "stage1") if d.isdigit()]
    assert len(saved) == 1 and 3 <= saved[0] < 100
    rerun = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed from step {saved[0]}" in rerun.stderr
    assert (workdir / "DONE.json").exists()


@pytest.mark.slow
def test_two_processes_on_loopback_train_both_stages_and_export(tmp_path, repo_root):
    """The multi-host path: per-process data slices, global arrays, gathered evals;
    one process then exports what both wrote."""
    workdir = tmp_path / "wd"
    run_two_processes(repo_root, [f"--config={repo_root}/configs/tokenizer.py:tiny", f"--workdir={workdir}"])
    evals = _eval_lines(str(workdir))
    assert [e["stage"] for e in evals] == ["stage1", "stage2"]
    assert evals[-1]["num_examples"] == 64 and "codebook/used_codes" in evals[-1]
    assert_export_holds_both_stages(str(workdir), str(tmp_path / "export"), repo_root)


@pytest.mark.slow
@pytest.mark.parametrize("service, log_every", [(True, 100000), (False, 4)])
def test_sigterm_on_one_of_two_processes_stops_both_at_one_step(tmp_path, repo_root, service, log_every):
    """Two processes agreed on a SIGTERM only at log steps (a collective each), so a run
    logging every few hundred steps could outlast the 30 s a preemption notice leaves.
    JAX's preemption service now brings both to one step, any step: here the run never
    logs before its 100000th step, and SIGTERM reaches process 1 alone. With the service
    off (`JAX_ENABLE_PREEMPTION_SERVICE=false`) they agree at a log step, as before."""
    workdir = tmp_path / "wd"
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    procs = start_two_processes(repo_root, [
        f"--config={repo_root}/configs/tokenizer.py:tiny", f"--workdir={workdir}", "--config.stage1.num_steps=100000",
        f"--config.log_every_steps={log_every}", "--config.checkpoint_every_steps=100000",
        "--config.eval_every_steps=100000"], logs, env={"JAX_ENABLE_PREEMPTION_SERVICE": str(service).lower()})
    try:
        # the service takes SIGTERM from jax.distributed.initialize on, our handler from the first step on
        metrics = workdir / "metrics.jsonl"
        started = ((lambda: "mesh {" in logs[1].read_text()) if service else
                   (lambda: metrics.exists() and "stage1" in metrics.read_text()))
        deadline = time.time() + 240
        while not started() and time.time() < deadline:
            assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], outputs
    stopped = [re.findall(r"stage1: preempted at step (\d+); checkpoint saved", out) for out in outputs]
    assert stopped[0] == stopped[1] and len(stopped[0]) == 1, outputs
    assert os.listdir(workdir / "checkpoints" / "stage1") == stopped[0]
    assert service or int(stopped[0][0]) % log_every == 0


_SAVES_AFTER_AN_EXPORT_BY_PROCESS_0 = """
import sys
import jax
flags = dict(a.split("=") for a in sys.argv[2:] if "=" in a)
jax.distributed.initialize(flags["--coordinator_address"], int(flags["--num_processes"]), int(flags["--process_id"]))
import grain
import numpy as np
from orbax.checkpoint._src.futures.synchronization import OperationIdGenerator
from seed_jax import parallel, weights
from seed_jax.models.clip_text import CLIPTextConfig
from seed_jax.trainers import checkpointing
workdir = sys.argv[1]
if jax.process_index() == 0:  # as ensure_trained exports the tokenizer the decoder then trains on
    config = CLIPTextConfig(vocab_size=16, max_length=4, width=8, depth=1, num_heads=1, mlp_dim=8)
    weights.save(workdir + "/export", "clip_text", config, weights.flat_params(weights.build("clip_text", config)))
data = iter(grain.MapDataset.range(8).to_iter_dataset())
state = {"x": jax.device_put(np.zeros(4, np.float32), parallel.replicated(parallel.make_mesh({"data": -1})))}
checkpointer = checkpointing.Checkpointer(workdir + "/checkpoints", keep=3)
for step in (1, 2, 3):
    checkpointer.save(step, state, data, {})
    checkpointer.wait()
checkpointer.close()
print("operation id", OperationIdGenerator.get_current_operation_id())
"""


def test_two_processes_checkpoint_after_process_0_alone_wrote_an_export(tmp_path, repo_root):
    """orbax keys a save's cross-process signals by a counter that every save advances,
    process 0's export alone included: the run's next saves were keyed apart, process 1
    wrote the data iterator's state before process 0 had made its directory
    (FileNotFoundError; the decoder demo on two processes crashed at its first checkpoint)."""
    outputs = run_two_processes(repo_root, [str(tmp_path)], program=("-c", _SAVES_AFTER_AN_EXPORT_BY_PROCESS_0))
    ids = [line for out in outputs for line in out.splitlines() if line.startswith("operation id")]
    assert len(ids) == 2 and ids[0] == ids[1], outputs
    assert sorted(os.listdir(tmp_path / "checkpoints" / "3" / "data")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.parametrize("overrides, field", [({"batch_size": 12}, "batch_size"),
                                              ({"stage2.batch_size": 4}, "stage2.batch_size"),
                                              ({"eval.batch_size": 20}, "eval.batch_size")])
def test_a_batch_size_that_does_not_split_over_the_mesh_fails_naming_it(tmp_path, overrides, field):
    """On one process such a batch was replicated, silently: each of the 8 devices
    computed the whole batch. It is refused before the data is made."""
    size = next(iter(overrides.values()))
    with pytest.raises(ValueError, match=rf"^{field}: {size} does not divide by 8, .*\(mesh \{{'data': 8, "):
        trainer.train(_tiny(**overrides), str(tmp_path))
    assert not os.path.exists(tmp_path / "data")


@pytest.mark.parametrize("overrides, field", [({"stage1.batch_size": -16}, "stage1.batch_size"),
                                              ({"batch_size": 0}, "batch_size"),
                                              ({"eval.batch_size": -32}, "eval.batch_size")])
def test_a_batch_size_below_1_fails_naming_it(tmp_path, overrides, field):
    """A negative batch divides by the mesh: it failed as grain's bare "batch_size must be
    positive." once the model was built. It is refused before the data is made."""
    size = next(iter(overrides.values()))
    with pytest.raises(ValueError, match=rf"^{field}: expected an integer >= 1, got {size}$"):
        trainer.train(_tiny(**overrides), str(tmp_path))
    assert not os.path.exists(tmp_path / "data")


def test_axis_rules_naming_an_unknown_mesh_axis_fail_naming_the_field(tmp_path):
    """A typo'd mesh axis in `axis_rules` failed as a bare KeyError; it is refused before the data is made."""
    with pytest.raises(ValueError, match=r"^axis_rules: \('batch', 'dat'\) is not a \(logical name, mesh axes\) rule"):
        trainer.train(_tiny(axis_rules=(("batch", "dat"), ("embed", "fsdp"))), str(tmp_path))
    assert not os.path.exists(tmp_path / "data")


def test_stage1_trains_with_the_temperature_frozen():
    """`temp` left out of stage1.trainable: the clamp has nothing to clamp (it raised
    KeyError 'temp'); the temperature keeps its initial value."""
    trainable = tuple(n for n in get_config("tiny").stage1.trainable if n != "temp")
    config = _tiny(**{"stage1.trainable": trainable})
    losses, state = _losses(config, parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]), "stage1",
                            num_steps=2)
    assert np.isfinite(losses).all() and "temp" not in state["params"]["tokenizer"]


def test_restarting_codes_of_a_frozen_codebook_fails_naming_the_fields(tmp_path):
    """Restarts with 'quantize' left out of stage2.trainable failed at stage II's first
    step with a bare KeyError 'quantize'; now before anything runs, naming both fields."""
    trainable = tuple(n for n in get_config("tiny").stage2.trainable if n != "quantize")
    with pytest.raises(ValueError, match=r"restart_unused_codes_every=2 .*'quantize' is not in stage2.trainable"):
        trainer.train(_tiny(**{"stage2.trainable": trainable}), str(tmp_path))
    with pytest.raises(ValueError, match=r"restart_unused_codes_every: expected an integer >= 0 .* got -2"):
        trainer.train(_tiny(**{"stage2.restart_unused_codes_every": -2}), str(tmp_path))
    assert not os.listdir(tmp_path)


def test_a_misspelt_trainable_module_fails_before_anything_trains(tmp_path):
    """A name in stage2.trainable that is no module of the tokenizer failed when stage II
    began, after all of stage I (seed1: 50k steps), and stage2.trainable defines the run,
    so its workdir then refused the corrected name. The names offered held attributes
    such as 'config' and '_pytree__nodes' among the modules."""
    trainable = tuple(get_config("tiny").stage2.trainable) + ("blocks_txt",)
    with pytest.raises(ValueError, match=r"^stage2.trainable: \['blocks_txt'\] are not modules of the model under "
                                         r"tokenizer; expected names from \[") as error:
        trainer.train(_tiny(**{"stage2.trainable": trainable}), str(tmp_path))
    offered = set(re.search(r"expected names from (\[.*\])", str(error.value)).group(1)[2:-2].split("', '"))
    assert {"blocks_text", "quantize", "visual_encoder", "temp"} <= offered
    assert not offered & {"config", "dtype", "_pytree__nodes"}
    assert "quote" not in str(error.value)
    # `--config.stage1.trainable=(qformer,ln_vision)` reads as this one name: the error says to quote
    with pytest.raises(ValueError, match=r"^stage1.trainable: \['\(qformer,ln_vision\)'\] are not modules .*; on "
                                         r"the command line, quote each name: --config.stage1.trainable=\"\('a','b'\)\"$"):
        trainer.train(_tiny(**{"stage1.trainable": ("(qformer,ln_vision)",)}), str(tmp_path))
    assert not os.listdir(tmp_path)
    config = get_config("tiny")
    config.init.stage1, config.stage1.trainable = "/ckpt/stage1_export", ("no_such_module",)  # stage I does not run
    trainer.check_config(config)


@pytest.mark.slow
@pytest.mark.parametrize("recon_head", [True, False], ids=["recon_head", "shared_head"])
def test_each_loss_reaches_the_modules_check_trainable_counts_on(recon_head):
    """`trainer.stage_losses_reach`, by which a trainable module no loss reaches is
    refused, against a tiny model's gradients: each loss's gradient is nonzero in exactly
    the tokenizer modules listed for it."""
    config = _tiny(**{"model.recon_head": recon_head})
    _, _, create = trainer.build_model(config)
    graphdef, params, rest = nnx.split(create(), nnx.Param, ...)
    batch = _batch(config, 0)

    def reached(loss_of) -> set[str]:
        grads = weights.flat_params(nnx.merge(graphdef, jax.grad(loss_of)(params), rest))
        return {k.split(".")[1] for k, g in grads.items() if k.startswith("tokenizer.") and np.any(g != 0)}

    stage1 = trainer.stage1_loss(config.label_smoothing)
    itc = reached(lambda p: stage1(nnx.merge(graphdef, p, rest), batch, jax.random.key(0))[0])
    assert itc == set(trainer.stage_losses_reach(config, "stage1")["itc"])
    for loss, modules in trainer.stage_losses_reach(config, "stage2").items():
        def part(p, loss=loss):
            return trainer.stage2_losses(nnx.merge(graphdef, p, rest), batch["image"], batch["clip_ids"])[0][
                f"{loss}_loss"]

        assert reached(part) == set(modules), loss


def test_a_trainable_module_no_loss_reaches_fails_naming_it():
    """A module in a stage's `trainable` that none of its losses reaches (L_distill
    weighted 0 with the reverse Q-Former trained, the Q-Former listed for stage II, the
    codebook for stage I) took no gradient, only AdamW's weight decay, silently."""
    config = get_config("demo")
    config.loss_weights.distill = 0.0
    with pytest.raises(ValueError, match=r"^stage2.trainable: \['reverse_qformer', 'distill_text_proj'\] get no "
                                         r"gradient in stage2 \(vq reaches .*\): they would not learn, .*; drop "
                                         r"them from stage2.trainable, or set loss_weights.distill > 0$"):
        trainer.check_config(config)
    config = get_config("demo")
    config.stage2.trainable = tuple(config.stage2.trainable) + ("qformer",)
    with pytest.raises(ValueError, match=r"^stage2.trainable: \['qformer'\] get no gradient .* drop them from "
                                         r"stage2.trainable$"):
        trainer.check_config(config)
    config = get_config("demo")
    config.stage1.trainable = tuple(config.stage1.trainable) + ("quantize",)
    with pytest.raises(ValueError, match=r"^stage1.trainable: \['quantize'\] get no gradient in stage1 \(itc "
                                         r"reaches \['visual_encoder', "):
        trainer.check_config(config)
    for preset in ("demo", "seed1", "tiny"):
        trainer.check_config(get_config(preset))


def test_a_reconstruction_head_left_untrained_fails_naming_it():
    """The demo trains L_recon through the generation path's blocks; turning
    model.recon_head on without training pos_embed and blocks kept that head at its
    random init, silently."""
    config = get_config("demo")
    config.model.recon_head = True
    with pytest.raises(ValueError, match=r"model.recon_head: .*pos_embed, blocks is not in stage2.trainable"):
        trainer.check_config(config)
    config.stage2.trainable = STAGE2_TRAINABLE
    trainer.check_config(config)
    seed1 = get_config("seed1")  # its own head, trained
    trainer.check_config(seed1)


def test_a_generation_output_unlike_the_clip_text_output_fails_naming_the_fields():
    """L_distill compares the reverse Q-Former's (num_queries, generation_width) output
    with the CLIP text output: another shape failed as a bare broadcasting error at stage
    II's first step, after all of stage I, or (a side of 1) broadcast silently."""
    for key, value, shape in [("model.generation_width", 24, (77, 24)), ("model.generation_width", 1, (77, 1)),
                              ("model.reverse_qformer.num_queries", 64, (64, 16))]:
        with pytest.raises(ValueError, match=re.escape(
                f"model.reverse_qformer.num_queries, model.generation_width {shape}: expected those of the CLIP "
                "text output stage II distils into, clip_text.max_length, clip_text.width (77, 16)")):
            trainer.check_config(_tiny(**{key: value}))
    trainer.check_config(_tiny(**{"model.generation_width": 24, "clip_text.width": 24}))


def test_shard_folders_given_to_the_shapes_world_fail_naming_them():
    """The demo presets read the synthetic shapes world: --config.data.train_dir given
    to them, as README's command for real shards does with seed1, was ignored, silently."""
    config = get_config("demo")
    config.data.train_dir = "/data/cc3m/array_record"
    with pytest.raises(ValueError, match=r"data.train_dir='/data/cc3m/array_record': data.source is 'synthetic'"):
        trainer.check_config(config)
    config.data.source = "array_record"
    trainer.check_config(config)
    config.data.source = "tfds"
    with pytest.raises(ValueError, match=r"data.source: expected 'synthetic' or 'array_record', got 'tfds'"):
        trainer.check_config(config)


def test_splits_that_share_their_shards_are_warned_of(tmp_path, caplog):
    """Shards written with make_records' default --prefix=train, given as both splits (the
    eval prefix set to train too, or one folder's shards through a link), trained on the
    images the run is evaluated on, without a word."""
    from seed_jax.data import records

    shards = tmp_path / "shards"
    paths = records.write_array_record_shards([{"image": b"x", "caption": "c", "id": "a.jpg"}], str(shards), "train",
                                              2)
    os.symlink(shards, tmp_path / "linked")
    config = get_config("tiny")
    config.data.update(dict(source="array_record", train_dir=str(shards), train_prefix="train",
                            eval_dir=str(tmp_path / "linked"), eval_prefix="train"))
    with caplog.at_level("WARNING"):
        assert trainer.dataset_paths(config, str(tmp_path / "run"))[0] == paths
    assert re.search(r"data.train_dir/train_prefix and data.eval_dir/eval_prefix share 2 of their shards .*: the "
                     "run is evaluated on images it trains on", caplog.text)
    caplog.clear()
    records.write_array_record_shards([{"image": b"x", "caption": "c", "id": "b.jpg"}], str(shards), "eval", 1)
    config.data.eval_prefix = "eval"
    with caplog.at_level("WARNING"):
        trainer.dataset_paths(config, str(tmp_path / "run"))
    assert "evaluated on images it trains on" not in caplog.text


@pytest.mark.parametrize("overrides, message", [
    ({"data.synthetic.seed": -1}, r"^data.synthetic.seed: expected an integer >= 0, got -1$"),
    ({"data.synthetic.num_train": 0}, r"^data.synthetic.num_train: expected an integer >= 1, got 0$"),
    ({"data.max_text_length": 1}, r"^data.max_text_length: expected an integer >= 2 \(\[CLS\] and \[SEP\] at least\)"),
    ({"data.max_text_length": 65}, r"^data.max_text_length: 65 exceeds model.qformer.max_positions 64, ")])
def test_data_settings_out_of_range_fail_naming_them(tmp_path, overrides, message):
    """A negative shapes-world seed failed as numpy's "expected non-negative integer", no
    train examples as a traceback; a caption length below 2 failed in grain's batching
    (nothing cut, nothing padded) and one past the Q-Former's positions at the first step,
    naming input_ids. Each is refused before the data is made, naming the field."""
    with pytest.raises(ValueError, match=message):
        trainer.train(_tiny(**overrides), str(tmp_path))
    assert not os.path.exists(tmp_path / "data")


@pytest.mark.parametrize("scale", [(0.9,), (0.5, 0.8, 1.0), (0.5, 1.5), (1.0, 0.5), (0.0, 1.0)])
def test_a_crop_scale_that_is_no_area_range_fails_naming_it(scale):
    """`--config.data.crop_scale=0.9` gave (0.9,), trained as (0.9, 1.0); three numbers
    failed in the data workers; fractions above 1 fell back to the centre crop at every draw."""
    with pytest.raises(ValueError, match=re.escape(f"data.crop_scale: expected (min, max) fractions of the image's "
                                                   f"area, 0 < min <= max <= 1 (e.g. --config.data.crop_scale=\"(0.8, "
                                                   f"1.0)\"), got {scale}")):
        trainer.check_config(_tiny(**{"data.crop_scale": scale}))
    trainer.check_config(_tiny(**{"data.crop_scale": (1, 1)}))


def test_an_unknown_contrastive_gradient_fails_naming_it():
    config = get_config("tiny")
    config.itc_gradient = "local"
    with pytest.raises(ValueError, match=r"itc_gradient: expected one of \('global', 'lavis'\), got 'local'"):
        trainer.check_config(config)
    config.itc_gradient = "lavis"
    trainer.check_config(config)


def test_restarts_turned_on_with_no_fraction_to_run_in_fail_naming_the_fields(tmp_path):
    """seed1 leaves stage2.restart_until at 0.0: turning restarts on with
    --config.stage2.restart_unused_codes_every alone restarted no code, silently."""
    config = get_config("seed1")
    config.stage2.restart_unused_codes_every = 10
    with pytest.raises(ValueError, match=r"restart_unused_codes_every=10 .*restart_until is 0\.0: no step"):
        trainer.check_config(config)
    config.stage2.restart_until = 0.3
    trainer.check_config(config)
    with pytest.raises(ValueError, match=r"restart_until is 0\.0"):
        trainer.train(_tiny(**{"stage2.restart_until": 0.0}), str(tmp_path))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("key, value, message", [
    ("label_smoothing", 1.0, r"label_smoothing: expected a fraction in [0, 1) (0 = none), got 1.0"),
    ("label_smoothing", -0.1, r"label_smoothing: expected a fraction in [0, 1) (0 = none), got -0.1"),
    ("model.init_temperature", 0.0, r"model.init_temperature: expected a finite number > 0 (e.g. 0.07), got 0.0"),
    ("model.init_temperature", float("inf"), r"model.init_temperature: expected a finite number > 0"),
    ("loss_weights.recon", -2.0, r"loss_weights.recon: expected a finite number >= 0, got -2.0"),
    ("loss_weights.distill", float("nan"), r"loss_weights.distill: expected a finite number >= 0, got nan"),
    ("loss_weights", dict(vq=0.0, recon=0.0, distill=0.0), r"loss_weights: all are 0 ("),
    ("stage2.restart_until", 1.5, r"stage2.restart_until: expected the fraction of stage II's steps in which "
                                  r"unused codes restart, in [0, 1], got 1.5"),
])
def test_a_loss_setting_out_of_range_fails_naming_it(key, value, message):
    """Label smoothing of 1 (uniform targets) or more, a temperature of 0 or inf, a negative
    or NaN loss weight, all of them 0, and a restart fraction past stage II's end all
    trained on, without an error."""
    config = get_config("demo")
    config.update_from_flattened_dict({key: value})
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        trainer.check_config(config)
    config = get_config("demo")
    # a weight of 0 passes where the other losses reach what stage II trains (`check_trainable`)
    config.update_from_flattened_dict({"label_smoothing": 0.0, "model.init_temperature": 0.5,
                                       "loss_weights.recon": 0.0, "stage2.restart_until": 1.0})
    trainer.check_config(config)


def _multi_caption_split(path, undecodable_image: int | None = None) -> int:
    """An eval split of 7 images with 1 to 4 captions each (ids `img-j`, `img-j#k`), one
    image's last caption far from its others, one caption record corrupt (record 5,
    img-2's third), and, at record `undecodable_image`, a record whose image bytes are no
    image (its header and checksum whole); returns the record count."""
    from array_record.python import array_record_module

    from seed_jax.data import records, synthetic

    counts = [3, 1, 4, 2, 3, 1, 2]
    rows = [(j, k) for j, n in enumerate(counts) for k in range(n - (j == 0))] + [(0, counts[0] - 1)]
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for n, (j, k) in enumerate(rows):
        image = synthetic.make_example(j, 0, 32)
        if n == undecodable_image:
            image["image"] = b"\x89PNG no image follows"
        caption = synthetic.make_example(100 * k + j, 1, 8)["caption"]  # other captions of the shapes grammar
        data = records.encode_record({**image, "caption": caption, "id": f"img-{j}" + (f"#{k}" if k else "")})
        writer.write(data[:len(data) // 2] if n == 5 else data)
    writer.close()
    return len(rows)


@pytest.mark.parametrize("undecodable_image, encoded_records", [
    (None, [0, 2, 3, 7, 9, 12, 13]),
    (3, [0, 2, 4, 7, 9, 12, 13]),  # img-2's first record: its image from its second
    (2, [0, 3, 7, 9, 12, 13]),  # img-1's only record: img-1 left out
])
def test_eval_encodes_each_image_once_with_the_metrics_of_every_record(tmp_path, undecodable_image,
                                                                       encoded_records):
    """The evaluation ran the ViT and Q-Former on each caption record's image: 5 times a
    COCO image. It now encodes each image once; its metrics equal those of every record's
    image encoded (as before), for images of several captions, and a corrupt record.
    An image whose first record's image did not decode lost all its captions; its image
    now comes from its next record, that record alone skipped and counted."""
    config = _tiny(**{"eval.batch_size": 8, "eval.num_examples": pipeline.ALL_RECORDS})
    path = tmp_path / "eval.array_record"
    num_records = _multi_caption_split(path, undecodable_image)
    num_skipped = 1 + (undecodable_image is not None)
    qformer_text, clip_text = trainer.text_tokenizers(config, str(tmp_path))
    skipped = pipeline.SkipCounter()
    example = pipeline.Example(32, qformer_text, clip_text, skipped)
    mesh = parallel.make_mesh({"data": -1})
    _, _, create = trainer.build_model(config)
    model = create()
    evaluator = trainer.Evaluator(model, *trainer.eval_inputs([str(path)], example, config), mesh,
                                  config.axis_rules)
    encoded = []
    image_features = evaluator.image_features
    evaluator.image_features = lambda *args: encoded.append(args[1]["index"]) or image_features(*args)
    metrics = evaluator(model, 1, "stage2")
    assert skipped.count == num_skipped
    encoded = np.concatenate([global_batches.to_host(i) for i in encoded])
    assert len(encoded) == 8 and sorted(encoded[encoded >= 0]) == encoded_records  # 7 images at most, 1 batch

    # as before: every record's image encoded, its features paired with its caption's
    state = nnx.state(model)
    every = pipeline.eval_batches([str(path)], example, num_examples=num_records, global_batch_size=8,
                                   num_threads=1)
    parts = [{**image_features(state, b, True), **evaluator.text_features(state, b)}
             for b in (global_batches.global_batch(b, mesh, config.axis_rules) for b in every)]
    assert len(parts) * 8 == 16 > len(encoded)  # 16 records: 2 batches of images before, 1 now
    host = {k: np.concatenate([global_batches.to_host(p[k]) for p in parts]) for k in parts[0]}
    valid = host["index"] >= 0
    captions = [evaluator.captions[i] for i in host["index"][valid]]
    images = [evaluator.images[i] for i in host["index"][valid]]
    first_of_image = np.sort(np.unique(images, return_index=True)[1])
    expected = {**{f"retrieval/{k}": v for k, v in recall_at_k(host["image"][valid], host["text"][valid], captions,
                                                               images=images).items()},
                **{f"retrieval_codes/{k}": v for k, v in recall_at_k(host["image_from_codes"][valid],
                                                                     host["text"][valid], captions,
                                                                     images=images).items()},
                # each image's codes once: an image of 4 captions is not 4 images of the codebook
                **{f"codebook/{k}": v for k, v in codebook_usage(host["codes"][valid][first_of_image], 64).items()},
                "num_examples": float(num_records - num_skipped)}
    assert metrics == expected


def test_a_resumed_run_counts_the_eval_splits_skipped_records_once(tmp_path):
    """The evaluation counted the eval split's skipped records at its first pass, in each
    run: a run resumed from a checkpoint taken after an evaluation (its counts hold
    them) counted them again, the 2 of `_multi_caption_split(..., 3)` here."""
    config = _tiny(**{"eval.batch_size": 8, "eval.num_examples": pipeline.ALL_RECORDS})
    path = tmp_path / "eval.array_record"
    _multi_caption_split(path, 3)
    qformer_text, clip_text = trainer.text_tokenizers(config, str(tmp_path))
    mesh = parallel.make_mesh({"data": -1})
    _, _, create = trainer.build_model(config)
    model = create()

    def run(workdir, crash_at=None):
        """`_run_line_stage` evaluating `model` every 2 steps with an Evaluator of its own, as a run builds."""
        skipped = pipeline.SkipCounter()
        example = pipeline.Example(32, qformer_text, clip_text, skipped)
        evaluator = trainer.Evaluator(model, *trainer.eval_inputs([str(path)], example, config), mesh,
                                      config.axis_rules)

        def evaluate(line, step):
            if step == crash_at:
                raise RuntimeError("crash")
            return evaluator(model, step, "stage1")

        _run_line_stage(workdir / "ckpt", workdir, evaluate=evaluate, skipped=skipped, eval_every_steps=2)
        with open(workdir / "metrics.jsonl") as f:
            return [json.loads(line)["data/skipped_records"] for line in f if '"split": "train"' in line]

    with pytest.raises(RuntimeError, match="crash"):
        run(tmp_path / "resumed", crash_at=6)  # resumes from step 4, evaluated at step 2
    assert run(tmp_path / "resumed") == run(tmp_path / "straight") == [2 + i // 3 for i in range(1, 9)]


def test_an_eval_split_without_a_decodable_image_fails_naming_it(tmp_path):
    """Eval records that decode but none of whose images does gave NaN retrieval metrics
    (recall over no pairs) at each evaluation; the split is now refused before training."""
    from array_record.python import array_record_module

    from seed_jax.data import records, synthetic

    path = str(tmp_path / "eval.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for i in range(3):
        writer.write(records.encode_record({**synthetic.make_example(i, 0, 32), "image": b"\x89PNG no image follows"}))
    writer.close()
    config = _tiny(**{"eval.num_examples": pipeline.ALL_RECORDS})
    qformer_text, clip_text = trainer.text_tokenizers(config, str(tmp_path))
    example = pipeline.Example(32, qformer_text, clip_text, pipeline.SkipCounter())
    with pytest.raises(ValueError, match=r"eval\.array_record\.\.\.: none of the eval split's first 3 records holds an "
                                         r"image that decodes \(the first: undecodable image"):
        trainer.eval_inputs([path], example, config)


def test_eval_retrieval_compares_captions_cleaned_as_the_text_head_reads_them(tmp_path):
    """With `blip_caption`, "A red star." and "a red star" are one text to the Q-Former
    (equal features); compared raw, retrieving the other image's one was a miss or a hit
    by the tie's order alone. The evaluation's captions are now the cleaned ones; with
    "none" (the demos'), as written."""
    from array_record.python import array_record_module

    from seed_jax.data import records, synthetic
    from seed_jax.data import text as caption_text

    path = str(tmp_path / "eval.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    raw = ["A red star.", "a red star", "(A blue circle)"]
    for i, caption in enumerate(raw):
        writer.write(records.encode_record({**synthetic.make_example(i, 0, 32), "caption": caption}))
    writer.close()
    config = _tiny(**{"eval.num_examples": pipeline.ALL_RECORDS})
    qformer_text, clip_text = trainer.text_tokenizers(config, str(tmp_path))
    for processor, expected in (("blip_caption", ["a red star", "a red star", "a blue circle"]), ("none", raw)):
        example = pipeline.Example(32, qformer_text, clip_text, pipeline.SkipCounter(),
                                   process_caption=caption_text.caption_processor(processor))
        assert list(trainer.eval_inputs([path], example, config)[2]) == expected


def test_missing_tokenizer_files_fail_naming_their_config_fields(tmp_path):
    """A missing BERT vocab.txt or CLIP vocab.json / merges.txt was named `vocab_file` /
    `clip_vocab_file` alone: no field of the config. The error now names the field, after
    the prefix of a trainer's nested tokenizer config."""
    config = _tiny(**{"data.tokenizer.kind": "bert_vocab"})
    with pytest.raises(FileNotFoundError, match=r"^tokenizer\.data\.tokenizer\.vocab_file: '' does not exist"):
        trainer.text_tokenizers(config, str(tmp_path), "tokenizer.")
    config.data.tokenizer.vocab_file = str(tmp_path / "vocab.txt")
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "star"]))
    with pytest.raises(FileNotFoundError, match=r"^data\.tokenizer\.clip_vocab_file: '' does not exist"):
        trainer.text_tokenizers(config, str(tmp_path))


def test_stage_functions_name_an_unknown_stage():
    """Any name but "stage1" used to get stage II's loss."""
    with pytest.raises(ValueError, match=r"^stage: expected 'stage1' or 'stage2', got 'stage_2'$"):
        trainer.stage_functions(get_config("tiny"), "stage_2")

"""The de-tokenizer demo trainer end to end at tiny size, the codes -> image API on
its export, the pixel-space latent rearrangement and the noise schedule."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from configs.decoder import get_config
from seed_jax import api, command_line, parallel, weights
from seed_jax.diffusion.schedule import NoiseSchedule, add_noise
from seed_jax.models.clip_text import CLIPTextConfig
from seed_jax.models.stable_diffusion import depth_to_space, space_to_depth
from seed_jax.trainers import decoder, global_batches, loop


@pytest.fixture(scope="module")
def trained(tiny_decoder_run):
    return tiny_decoder_run


def test_run_writes_metrics_grid_and_export(trained):
    with open(os.path.join(trained, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if r["stage"] == "decoder" and r["split"] == "eval"]
    assert len(evals) == 1
    for key in ("recon/similarity", "recon/text_to_image_similarity", "recon/unrelated_similarity"):
        assert -1.0 <= evals[0][key] <= 1.0
    assert [r["step"] for r in records if r["stage"] == "decoder" and r["split"] == "train"] == [2, 4]
    assert os.path.getsize(os.path.join(trained, "samples.png")) > 0
    assert os.listdir(os.path.join(trained, "tb")) == ["decoder"]  # a TensorBoard run per stage
    assert os.listdir(os.path.join(trained, "tb", "decoder"))
    with open(os.path.join(trained, "DONE.json")) as f:
        assert json.load(f)["steps"] == 4
    info = weights.read_config(os.path.join(trained, "export"))[2]
    assert info["steps"] == {"decoder": 4}
    assert info["uncond_probability"] == get_config("tiny").uncond_probability  # the API warns on 0


def test_an_export_after_num_steps_lowered_records_the_checkpoints_steps(trained, tmp_path):
    """A finished run's copy whose export was lost (e.g. killed before writing it),
    resumed with train.num_steps below its last checkpoint: it resumes from that
    checkpoint as it is, and the export and DONE.json recorded the config's steps, not
    those it was trained to."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    shutil.rmtree(copy / "export")
    (copy / "DONE.json").unlink()
    config = get_config("tiny")
    trained_steps = config.train.num_steps
    config.train.num_steps = trained_steps - 1
    assert decoder.train(config, str(copy))
    assert weights.read_config(str(copy / "export"))[2]["steps"] == {"decoder": trained_steps}
    assert json.loads((copy / "DONE.json").read_text())["steps"] == trained_steps


def test_decode_and_reconstruct_through_the_api(trained):
    with open(os.path.join(trained, "DONE.json")) as f:
        done = json.load(f)
    tokenizer = api.SeedTokenizer.load(done["tokenizer_export"], diffusion=done["export"], batch_size=4)
    size = tokenizer.diffusion.config.image_size
    codes = np.random.default_rng(0).integers(0, tokenizer.num_codes, (3, 32))
    images = tokenizer.decode(codes, num_steps=3, guidance_scale=2.0, sampler="ddim", seed=5)
    assert images.dtype == np.uint8 and images.shape == (3, size, size, 3)
    # Image i depends on (seed, i) alone: the same codes give the same image in a smaller batch, up to
    # XLA's float rounding, which differs with the batch's shape (2e-6 in [-1, 1] here: now and then a
    # pixel value one apart); another seed gives another image.
    alone = tokenizer.decode(codes[:1], num_steps=3, guidance_scale=2.0, sampler="ddim", seed=5).astype(int)
    assert np.abs(alone - images[:1]).max() <= 1 and np.mean(alone != images[:1]) < 0.01
    reseeded = tokenizer.decode(codes[:1], num_steps=3, guidance_scale=2.0, sampler="ddim", seed=6).astype(int)
    assert np.abs(reseeded - images[:1]).mean() > 10
    originals = np.random.default_rng(1).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    assert tokenizer.reconstruct(originals, num_steps=2, sampler="plms").shape == (2, size, size, 3)


def test_decode_needs_a_diffusion_model(trained):
    with open(os.path.join(trained, "DONE.json")) as f:
        tokenizer = api.SeedTokenizer.load(json.load(f)["tokenizer_export"])
    with pytest.raises(ValueError, match="diffusion="):
        tokenizer.decode(np.zeros((1, 32), np.int32))


@pytest.mark.parametrize("options, message", [
    (dict(sampler="euler"), "sampler"), (dict(num_steps=0), "num_steps"), (dict(seed=-1), "seed"),
    (dict(guidance_scale=None), "guidance_scale")])
def test_decode_checks_its_options_before_embedding_the_codes(trained, monkeypatch, options, message):
    """A bad option is named before the codes are embedded (a compile and a run of the
    reverse Q-Former; it once came after them)."""
    with open(os.path.join(trained, "DONE.json")) as f:
        done = json.load(f)
    tokenizer = api.SeedTokenizer.load(done["tokenizer_export"], diffusion=done["export"])

    def embedded(codes):
        raise AssertionError("the codes were embedded before the options were checked")

    monkeypatch.setattr(tokenizer, "embed_codes", embedded)
    with pytest.raises(ValueError, match=message):
        tokenizer.decode(np.zeros((1, 32), np.int32), **options)


def test_space_to_depth_round_trip():
    x = np.random.default_rng(0).standard_normal((2, 8, 12, 3)).astype(np.float32)
    patches = space_to_depth(x, 4)
    assert patches.shape == (2, 2, 3, 48)
    np.testing.assert_array_equal(patches[1, 1, 2].reshape(4, 4, 3), x[1, 4:8, 8:12])
    np.testing.assert_array_equal(depth_to_space(patches, 4), x)


def test_add_noise_follows_the_schedule():
    schedule = NoiseSchedule()
    abar = schedule.alphas_cumprod()
    assert abar[0] == pytest.approx(1 - 0.00085) and abar[-1] == pytest.approx(0.0047, rel=0.01)
    x0, noise = np.ones((2, 3)), np.full((2, 3), 2.0)
    noisy = np.asarray(add_noise(schedule, x0, noise, jax.numpy.asarray([0, 999])))
    np.testing.assert_allclose(noisy[:, 0], np.sqrt(abar[[0, 999]]) + 2 * np.sqrt(1 - abar[[0, 999]]), rtol=1e-6)


def _decoder_losses(mesh, num_steps=3):
    config = get_config("tiny")
    # Attention in the mid level alone (its transformer, with cross-attention to CLIP's text):
    # the levels' convolutions still chain, and the three steps compile in about half the time.
    config.unet.attention_levels = (False, False)
    clip_config = CLIPTextConfig(**config.tokenizer.clip_text.to_dict())
    empty = np.zeros(clip_config.max_length, np.int32)
    sd_config = decoder.diffusion_config(config, clip_config, empty)
    model = decoder.create_model(sd_config, config.tokenizer, mesh, config.axis_rules, jax.numpy.float32, 0)
    setup = loop.prepare_stage(model, loop.trainable_filter(model, (), config.train.trainable),
                               decoder.diffusion_loss(sd_config.schedule, 0.5, empty), config.train, config, mesh)
    rng = np.random.default_rng(0)
    state, losses = setup.state, []
    size = sd_config.image_size
    for _ in range(num_steps):
        batch = {"image": rng.uniform(-1, 1, (8, size, size, 3)).astype(np.float32),
                 "clip_ids": rng.integers(0, 64, (8, clip_config.max_length)).astype(np.int32)}
        state, metrics = setup.train_step(state, setup.frozen, global_batches.global_batch(batch, mesh, config.axis_rules))
        losses.append(float(metrics["loss"]))
    return losses, state


@pytest.mark.slow
def test_decoder_train_step_same_loss_on_1_and_8_devices():
    """The same losses and parameters, on a data x fsdp mesh and on one with data, fsdp
    and tensor all > 1 (one test, so the 1-device run is trained once whichever xdist
    worker runs it). On the second, XLA's partitioning of convolutions chained with
    kernels split (fsdp, tensor; Shardy and GSPMD alike) computed wrong kernel gradients
    (conv_in's off by half its size; the losses drifted 6e-4 in 3 steps) until each
    convolution's input was pinned to the batch split."""
    losses_1, state_1 = _decoder_losses(parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    params_1 = jax.tree.map(np.asarray, state_1["params"])
    assert losses_1[-1] < losses_1[0]
    for axes in ({"data": 2, "fsdp": 4}, {"data": 2, "fsdp": 2, "tensor": 2}):
        losses_8, state_8 = _decoder_losses(parallel.make_mesh(axes))
        np.testing.assert_allclose(losses_8, losses_1, rtol=1e-4, err_msg=str(axes))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(b), a, atol=1e-5, err_msg=str(axes)),
                     params_1, state_8["params"])
        specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state_8["params"])]
        assert any("fsdp" in str(spec) for spec in specs), f"{axes}: no parameter is sharded over fsdp"


def test_sampler_plans_reject_step_counts_past_the_schedule():
    """With steps_offset 1, 1000 "leading" steps reach timestep 1000 and 1000
    "linspace" steps repeat a timestep (NaN coefficients): named errors, while 999
    steps give finite plans inside the schedule."""
    from seed_jax.diffusion import samplers

    schedule = NoiseSchedule()
    for name in ("plms", "ddim", "dpm++2m"):
        sampler = samplers.get(name)
        plan = sampler.plan(schedule, 999)
        assert plan["timestep"].max() < 1000 and len(np.unique(plan["timestep"])) == 999
        assert all(np.isfinite(v.astype(np.float64)).all() for v in plan.values()), name
        for bad in (1000, 2.0):
            with pytest.raises(ValueError, match="num_steps: "):
                sampler.plan(schedule, bad)


def test_export_is_rewritten_when_the_run_was_extended(tmp_path):
    """A finished run resumed with more steps replaces its export (it used to keep the
    older weights and DONE.json); the same or fewer steps, in every stage, keep it."""
    config = get_config("tiny")
    clip_config = CLIPTextConfig(**config.tokenizer.clip_text.to_dict())
    sd_config = decoder.diffusion_config(config, clip_config, np.zeros(clip_config.max_length, np.int32))
    out = str(tmp_path / "export")
    params = {seed: weights.flat_params(weights.build("stable_diffusion", sd_config, seed=seed)) for seed in (0, 1)}

    def write(seed, **steps):
        return weights.write_unless_current(out, steps, lambda: weights.save(
            out, "stable_diffusion", sd_config, params[seed], info={"steps": steps}))

    assert write(0, a=4, b=2)
    assert not write(1, a=4, b=2)
    assert write(1, a=6, b=2)
    assert not write(0, a=5, b=2)
    assert write(0, a=6, b=3)  # one stage longer is enough
    assert write(1, a=6, b=3, c=1)  # a stage the export lacks
    assert weights.read_config(out)[2]["steps"] == {"a": 6, "b": 3, "c": 1}
    loaded = weights.flat_params(weights.load_model(out, kind="stable_diffusion")[0])
    np.testing.assert_array_equal(loaded["unet.conv_in.kernel"], params[1]["unet.conv_in.kernel"])


class _Stop(Exception):
    pass


def test_trains_on_the_tokenizer_runs_array_record_data(tmp_path, monkeypatch):
    """A tokenizer run on `data.source="array_record"` read its shards from
    data.train_dir / data.eval_dir; the decoder looked for them in TOKENIZER_WORKDIR/data
    (only the synthetic source writes there) and failed with FileNotFoundError. It now
    trains and evaluates on the tokenizer run's own splits, whatever their source, with
    `data.num_threads` and `data.prefetch` (once fixed at 2 and 4). Shards moved since the
    run trained were a traceback; they are a ConfigError naming the run and the folder."""
    from seed_jax.data import pipeline, synthetic
    from seed_jax.trainers import tokenizer as tokenizer_trainer

    config = get_config("tiny")
    config.data.update(num_threads=3, prefetch=5)
    tok_config = config.tokenizer.copy_and_resolve_references()
    data_dir = str(tmp_path / "elsewhere")
    for split, prefix in (("train", "shapes_train"), ("eval", "shapes_eval")):
        for path in synthetic.write_shapes_dataset(data_dir, split=split, num_examples=4, seed=0, image_size=16,
                                                   num_shards=1):
            os.rename(path, path.replace(f"{split}-", f"{prefix}-"))
    tok_config.data.update(source="array_record", train_dir=data_dir, train_prefix="shapes_train",
                           eval_dir=data_dir, eval_prefix="shapes_eval")
    tok_dir = str(tmp_path / "tokenizer")
    os.makedirs(tok_dir)
    monkeypatch.setattr(tokenizer_trainer, "ensure_trained", lambda *_: (tok_dir, "unused", tok_config))
    monkeypatch.setattr(decoder, "create_model", lambda *_: None)
    read = {}

    def evaluator(config, tokenizer_export, eval_paths, *_):
        read["eval"] = eval_paths
        raise _Stop

    def train_iterator(paths, *_, num_threads, prefetch, **__):
        read["options"] = num_threads, prefetch
        read["train"] = paths

    monkeypatch.setattr(pipeline, "train_iterator", train_iterator)
    monkeypatch.setattr(decoder, "Evaluator", evaluator)
    with pytest.raises(_Stop):
        decoder.train(config, str(tmp_path / "decoder"))
    assert read.pop("options") == (3, 5)
    assert {split: [os.path.basename(p) for p in paths] for split, paths in read.items()} == {
        "train": ["shapes_train-00000-of-00001.array_record"], "eval": ["shapes_eval-00000-of-00001.array_record"]}
    # shards moved since the run trained: a ConfigError (`python -m seed_jax.main` prints it alone), not a traceback
    shutil.rmtree(data_dir)
    moved = (rf"^the tokenizer run in {re.escape(tok_dir)} \(its config\.json\): data\.train_dir: no ArrayRecord "
             rf"shards named 'shapes_train-\*-of-\*\.array_record' in '{re.escape(data_dir)}'")
    with pytest.raises(command_line.ConfigError, match=moved):
        decoder.train(config, str(tmp_path / "decoder"))


def test_trains_and_generates_from_captions_cleaned_as_the_tokenizer_run_cleaned_them(tmp_path, monkeypatch):
    """Stage II distils the CLIP embeddings of captions cleaned by the tokenizer run's
    `data.caption_processor` (seed1: blip_caption), which the codes are decoded into; the
    decoder trained its UNet, and generated at evaluation, from the raw captions. Both
    now read them cleaned the same way."""
    from types import SimpleNamespace

    from array_record.python import array_record_module

    from seed_jax.data import pipeline, records, synthetic
    from seed_jax.data import text as caption_text
    from seed_jax.trainers import tokenizer as tokenizer_trainer

    config = get_config("tiny")
    config.eval.num_examples = 3
    tok_config = config.tokenizer.copy_and_resolve_references()
    raw_caption = "A RED Circle,  on the left!"
    data_dir = str(tmp_path / "data")
    os.makedirs(data_dir)
    for split in ("train", "eval"):
        writer = array_record_module.ArrayRecordWriter(
            os.path.join(data_dir, f"{split}-00000-of-00001.array_record"), "group_size:1")
        encoded = [records.encode_record({**synthetic.make_example(i, 0, 16), "caption": raw_caption})
                   for i in range(3)]
        for record in encoded:
            writer.write(record)
        writer.close()
    tok_config.data.update(source="array_record", train_dir=data_dir, eval_dir=data_dir,
                           caption_processor="blip_caption")
    tok_dir = str(tmp_path / "tokenizer")
    os.makedirs(tok_dir)
    monkeypatch.setattr(tokenizer_trainer, "ensure_trained", lambda *_: (tok_dir, "unused", tok_config))
    monkeypatch.setattr(decoder, "create_model", lambda *_: None)
    monkeypatch.setattr(api.SeedTokenizer, "load", lambda *_, **__: SimpleNamespace(image_size=16))
    made, build = {}, decoder.Evaluator

    def evaluator(*args):
        made["evaluator"] = build(*args)
        raise _Stop

    monkeypatch.setattr(pipeline, "train_iterator", lambda paths, example, **_: made.setdefault("example", example))
    monkeypatch.setattr(decoder, "Evaluator", evaluator)
    with pytest.raises(_Stop):
        decoder.train(config, str(tmp_path / "decoder"))
    _, clip_tokenizer = tokenizer_trainer.text_tokenizers(tok_config, tok_dir)
    cleaned = caption_text.blip_caption(raw_caption)
    want = clip_tokenizer([cleaned])[0][0]
    assert not np.array_equal(want, clip_tokenizer([raw_caption])[0][0])  # cleaning changes the prompt
    np.testing.assert_array_equal(made["example"].train((0, encoded[0]), None)["clip_ids"], want)
    np.testing.assert_array_equal(made["evaluator"].caption_ids, np.stack([want] * 3))


@pytest.mark.parametrize("process_index, counted", [(0, 1), (1, 0)])
def test_evaluator_skips_and_counts_corrupt_eval_records(process_index, counted, tmp_path, monkeypatch):
    """A record of the eval split that cannot be decoded crashed the decoder run when its
    evaluator was built (the project's rule: skipped and counted, never fatal); it is
    now left out and counted in data/skipped_records, with the others evaluated. Every
    process reads the eval records: process 0 counts them (the sum over two processes
    counted one corrupt record twice)."""
    from types import SimpleNamespace

    from array_record.python import array_record_module

    from seed_jax.data import pipeline, records, synthetic
    from seed_jax.trainers import tokenizer as tokenizer_trainer

    config = get_config("tiny")
    config.eval.num_examples = 4
    path = str(tmp_path / "eval-00000-of-00001.array_record")
    examples = [synthetic.make_example(i, 0, 16) for i in range(5)]
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for i, example in enumerate(examples):
        data = records.encode_record(example)
        writer.write(data[:len(data) // 2] if i == 1 else data)
    writer.close()
    monkeypatch.setattr(api.SeedTokenizer, "load", lambda *_, **__: SimpleNamespace(image_size=16))
    _, clip_tokenizer = tokenizer_trainer.text_tokenizers(config.tokenizer, str(tmp_path))
    monkeypatch.setattr(jax, "process_index", lambda: process_index)
    skipped = pipeline.SkipCounter()
    evaluator = decoder.Evaluator(config, "unused", [path], clip_tokenizer, None, str(tmp_path), skipped=skipped)
    assert evaluator.captions == [examples[i]["caption"] for i in (0, 2, 3)]
    assert evaluator.images.shape == (3, 16, 16, 3) and evaluator.caption_ids.shape[0] == 3
    assert skipped.count == counted


@pytest.mark.parametrize("uncond_probability, guidance_scale, warned", [
    (0.0, 3.0, True), (0.0, 1.0, False), (0.1, 3.0, False)])
def test_guidance_without_unconditional_training_is_warned_about_before_training(
        tmp_path, monkeypatch, caplog, uncond_probability, guidance_scale, warned):
    """`uncond_probability` 0 never trains the empty prompt that `eval.guidance_scale` > 1 guides by:
    one warning naming both, before the tokenizer is looked for."""
    from seed_jax.trainers import tokenizer as tokenizer_trainer

    def ensure_trained(*_):
        raise AssertionError("reached training")

    monkeypatch.setattr(tokenizer_trainer, "ensure_trained", ensure_trained)
    config = get_config("tiny")
    config.uncond_probability, config.eval.guidance_scale = uncond_probability, guidance_scale
    with caplog.at_level("WARNING"), pytest.raises(AssertionError, match="reached training"):
        decoder.train(config, str(tmp_path))
    warnings = [r.getMessage() for r in caplog.records if "uncond_probability" in r.getMessage()]
    assert len(warnings) == int(warned)
    if warned:
        assert f"eval.guidance_scale {guidance_scale:g} (> 1)" in warnings[0]
        assert warnings[0].startswith("uncond_probability is 0")


@pytest.mark.parametrize("key, value", [("eval.sampler", "ddpm"), ("eval.num_steps", 1000),
                                        ("eval.guidance_scale", float("nan")), ("uncond_probability", 1.5),
                                        ("uncond_probability", -0.1), ("dtype", "bf16"), ("eval.batch_size", 0),
                                        ("keep_checkpoints", 0), ("eval_every_steps", -1),
                                        ("train.batch_size", 12), ("train.trainable", ("unet", "text_encoder")),
                                        ("train.trainable", ()), ("eval.grid_examples", 0),
                                        ("eval.grid_examples", -1), ("schedule.beta_start", -0.001),
                                        ("schedule.beta_end", 1.0), ("schedule.beta_schedule", "cosine"),
                                        ("data.num_threads", -1), ("data.prefetch", -1),
                                        ("train.num_steps", -1), ("train.warmup_steps", -1)])
def test_bad_options_fail_before_training(tmp_path, monkeypatch, key, value):
    """The evaluation's sampling options were first used at the end of training (and
    there before the last checkpoint was saved): a bad one cost the whole run. They are
    now checked before the tokenizer is even looked for, as are `uncond_probability`
    (outside [0, 1], every caption or none was silently dropped), `dtype` (a bare
    KeyError once the tokenizer was ready), `eval.batch_size` ('batch_size: expected
    >= 1' from the evaluator, built after the tokenizer was trained) and the loop's
    settings (`keep_checkpoints` 0 kept no checkpoint; an interval of 0 failed at the
    first step; `eval_every_steps` 0 is now AT_STAGE_END), as is a `train.batch_size` that does not split over the mesh's 8 devices
    (each computed the whole batch), and a `train.trainable` other than the UNet (the loss stops the text encoder's
    gradient: naming it trained nothing there, and weight_decay > 0 shrank it; () trained nothing) and an
    `eval.grid_examples` below 1 (samples.png was a blank 2-pixel strip for 0, short of its last columns below),
    and betas outside (0, 1) (NaN losses or sampling), and a negative `data.num_threads` or
    `data.prefetch` (grain's error once the data were opened), and a negative `train.num_steps`
    (no training, without a word) or `train.warmup_steps`, named as their config keys."""
    from seed_jax.trainers import tokenizer as tokenizer_trainer

    def ensure_trained(*_):
        raise AssertionError("reached training")

    monkeypatch.setattr(tokenizer_trainer, "ensure_trained", ensure_trained)
    config = get_config("tiny")
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[leaf] = value
    with pytest.raises(ValueError, match=f"{key}: "):
        decoder.train(config, str(tmp_path))


@pytest.mark.parametrize("settings, message", [
    (dict(norm_groups=7), "unet: groups: 7 must divide the channel count 16"),
    (dict(num_heads=(2, 3)), "unet: num_heads: 3 must divide width 32"),
    (dict(block_channels=(16, 32, 64)), "unet: attention_levels: expected 3 entries"),
    (dict(foo=1), "unet: .*unexpected keyword argument 'foo'"),
    (dict(layers_per_block=0), "unet.layers_per_block: expected >= 1, got 0"),
    (dict(sample_size=0), "unet.sample_size: expected >= 1, got 0"),
    (dict(out_channels=4), r"unet.out_channels: expected unet.in_channels \(12: .* got 4"),
    (dict(in_channels=4, out_channels=4), "unet.in_channels 4 != the latent channels 12"),
    (dict(pixel_patch=0), "pixel_patch: expected >= 1, got 0")])
def test_bad_unet_settings_fail_before_training(tmp_path, monkeypatch, settings, message):
    """The UNet was first built after the tokenizer run it needs was trained: a bad
    `unet.*` or `pixel_patch` cost that run, then failed as "groups: 7 must divide ...",
    a TypeError, or (layers_per_block 0, out_channels other than in_channels, sample_size 0)
    a broadcasting or grain error at the first training step."""
    from seed_jax.trainers import tokenizer as tokenizer_trainer

    def ensure_trained(*_):
        raise AssertionError("reached training")

    monkeypatch.setattr(tokenizer_trainer, "ensure_trained", ensure_trained)
    config = get_config("tiny")
    if "pixel_patch" in settings:
        config.pixel_patch = settings.pop("pixel_patch")
    config.unet.update(settings)
    with pytest.raises(ValueError, match=message):
        decoder.train(config, str(tmp_path))

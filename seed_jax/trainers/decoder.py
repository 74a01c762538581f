"""De-tokenizer training: a text-conditioned diffusion UNet on the tokenizer's data,
conditioned on the tokenizer's frozen CLIP text encoder (captions cleaned by the
tokenizer run's `data.caption_processor`, as its stage II distilled them), then SEED
reconstruction measured with the tokenizer's stage-I image features.

The tokenizer comes from `config.tokenizer_workdir` (trained first, with
`config.tokenizer`, when that workdir holds no finished run); its CLIP text encoder
is rebuilt exactly as that run built it (its own config; seeded, frozen).
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from seed_jax import api, command_line, parallel, weights
from seed_jax.data import pipeline, preprocess, records, text
from seed_jax.diffusion import samplers
from seed_jax.diffusion.schedule import NoiseSchedule, add_noise, training_target
from seed_jax.evaluators.reconstruction import image_grid, reconstruction_similarity
from seed_jax.models import layers
from seed_jax.models.clip_text import CLIPTextConfig
from seed_jax.models.stable_diffusion import StableDiffusion, StableDiffusionConfig
from seed_jax.models.unet import UNet, UNetConfig
from seed_jax.trainers import checkpointing, coordination, global_batches, loop, optim, reporting, run_config
from seed_jax.trainers import tokenizer as tokenizer_trainer

# What a run trained; a run resumed in its workdir may not change them (`run_config.write`).
# `tokenizer_workdir`: the run whose frozen CLIP text encoder conditions the UNet.
RUN_DEFINING = ("trainer", "seed", "unet", "pixel_patch", "schedule", "train.trainable", "tokenizer_workdir")
RUN_PATHS = ("tokenizer_workdir",)  # compared as absolute paths
# The UNet alone: the CLIP text encoder is the tokenizer run's (its reverse Q-Former distils
# into that space), and the loss passes it no gradient.
TRAINABLE = ("unet",)


def diffusion_loss(schedule: NoiseSchedule, uncond_probability: float, empty_ids: np.ndarray):
    """MSE to the schedule's target (noise or v) at uniform timesteps; a caption is replaced by the empty
    prompt with `uncond_probability` (so guidance has an unconditional model)."""
    empty_ids = jnp.asarray(empty_ids)[None]

    def loss_fn(model: StableDiffusion, batch, rng):
        r_time, r_noise, r_drop = jax.random.split(rng, 3)
        x0 = model.images_to_latents(batch["image"])
        batch_size = x0.shape[0]
        context = jax.lax.stop_gradient(model.text_encoder(batch["clip_ids"]))
        empty = jax.lax.stop_gradient(model.text_encoder(empty_ids))
        dropped = jax.random.bernoulli(r_drop, uncond_probability, (batch_size,))
        context = jnp.where(dropped[:, None, None], empty, context)
        timesteps = jax.random.randint(r_time, (batch_size,), 0, schedule.num_train_timesteps)
        noise = jax.random.normal(r_noise, x0.shape)
        predicted = model.unet(add_noise(schedule, x0, noise, timesteps), timesteps, context)
        loss = jnp.mean(jnp.square(predicted - training_target(schedule, x0, noise, timesteps)))
        return loss, ({"mse": loss}, {})

    return loss_fn


def diffusion_config(config, clip_config: CLIPTextConfig, empty_ids: np.ndarray) -> StableDiffusionConfig:
    unet = UNetConfig.from_dict({**config.unet.to_dict(), "cross_attention_dim": clip_config.width})
    return StableDiffusionConfig(unet=unet, vae=None, pixel_patch=config.pixel_patch, text_encoder=clip_config,
                                 schedule=noise_schedule(config),
                                 empty_prompt_ids=tuple(int(i) for i in empty_ids))


def noise_schedule(config) -> NoiseSchedule:
    """`config.schedule` as a NoiseSchedule; a bad field is named as the config key ("schedule.beta_end: ...")."""
    try:
        return NoiseSchedule(**config.schedule.to_dict())
    except ValueError as error:
        raise ValueError(f"schedule.{error}") from None


def create_model(sd_config: StableDiffusionConfig, tokenizer_config, mesh, rules, dtype, seed: int):
    """The diffusion model initialised into its shardings, with the tokenizer run's
    CLIP text encoder weights."""
    create = lambda: StableDiffusion(sd_config, dtype=dtype, rngs=nnx.Rngs(seed))  # noqa: E731
    graphdef, abstract = nnx.split(nnx.eval_shape(create))
    shardings = parallel.state_shardings(abstract, mesh, rules)
    model = nnx.merge(graphdef, jax.jit(lambda: nnx.state(create()), out_shardings=shardings)())
    clip_text = tokenizer_trainer.create_clip_text(tokenizer_config, mesh)
    weights.assign(model.text_encoder, weights.flat_params(clip_text))
    return model


# ---------------------------------------------------------------- evaluation
class Evaluator:
    """Reconstructs held-out images from their SEED codes and generates from their
    captions; returns the similarities (the train loop writes them) and saves an image
    grid."""

    def __init__(self, config, tokenizer_export: str, eval_paths, clip_tokenizer, writer, workdir: str,
                 skipped: pipeline.SkipCounter, process_caption: Callable[[str], str] = str):
        """Reads the first `eval.num_examples` records; corrupt ones are left out and
        counted in `skipped` (on process 0: every process reads them all). The captions
        are generated from as `process_caption` makes them (training's processor)."""
        self.config, self.writer, self.workdir = config, writer, workdir
        skipped = pipeline.counted_once(skipped)
        self.tokenizer = api.SeedTokenizer.load(tokenizer_export, batch_size=config.eval.batch_size)
        self._apis = None  # built at the first evaluation, then kept with their programs
        images, self.captions, self.image_ids = [], [], []
        for raw in pipeline.read_records(eval_paths, config.eval.num_examples):
            try:
                record = records.decode_record(raw)
                image = preprocess.resize(preprocess.decode_image(record["image"]), self.tokenizer.image_size)
            except ValueError as error:
                logging.warning("decoder eval: skipping a corrupt record (%s)", error)
                skipped.add()
                continue
            images.append(image)
            self.captions.append(record["caption"])
            self.image_ids.append(records.image_id(record["id"]))  # an image's captions are records of it
        if len(set(self.image_ids)) < 2:
            raise ValueError(f"eval.num_examples: the first {config.eval.num_examples} eval records hold "
                             f"{len(set(self.image_ids))} decodable images; the evaluation needs at least 2")
        self.images = np.stack(images)
        self.caption_ids = clip_tokenizer([process_caption(c) for c in self.captions])[0]

    def apis(self, model: StableDiffusion) -> tuple[api.StableDiffusion, api.SeedTokenizer]:
        """`model` behind the API, and the tokenizer painting through it; their programs
        are compiled once across evaluations (the API holds the model's variables, so it
        reads what training writes into them)."""
        if self._apis is None or self._apis[0].model is not model:
            diffusion = api.StableDiffusion(model, batch_size=self.config.eval.batch_size)
            self._apis = diffusion, api.SeedTokenizer(self.tokenizer.model, batch_size=self.config.eval.batch_size,
                                                      diffusion=diffusion)
        return self._apis

    def __call__(self, model: StableDiffusion, step: int) -> dict[str, float]:
        e = self.config.eval
        diffusion, tokenizer = self.apis(model)
        options = dict(num_steps=e.num_steps, guidance_scale=e.guidance_scale, sampler=e.sampler)
        reconstructions = tokenizer.reconstruct(self.images, seed=step, **options)
        from_captions = api.to_uint8(diffusion.sample(diffusion.encode_text(self.caption_ids), seed=step, **options))
        metrics = reconstruction_similarity(tokenizer, self.images, reconstructions, from_captions, self.image_ids)
        logging.info("decoder eval at step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if jax.process_index() == 0:
            k = e.grid_examples
            grid = image_grid([self.images[:k], reconstructions[:k], from_captions[:k]], self.tokenizer.image_size)
            preprocess.Image.fromarray(grid).save(os.path.join(self.workdir, "samples.png"))
            self.writer.tb("decoder").add_image("samples", grid, step, dataformats="HWC")
            records.write_json(os.path.join(self.workdir, "samples.json"),
                               {"rows": ["original", "reconstruction from SEED codes", "generated from the caption"],
                                "captions": self.captions[:k], "step": step}, indent=2)
        return metrics


# ---------------------------------------------------------------- driver
def check_unet(config) -> None:
    """`pixel_patch` and `unet`: the UNet is built on shapes (with any context width: the
    tokenizer run's CLIP width is read once that run is trained), a bad setting named."""
    for key, value in (("pixel_patch", config.pixel_patch), ("unet.sample_size", config.unet.sample_size),
                       ("unet.layers_per_block", config.unet.layers_per_block)):
        if value < 1:
            raise ValueError(f"{key}: expected >= 1, got {value}")
    if config.unet.out_channels != config.unet.in_channels:  # the loss compares the output with the input's shape
        raise ValueError(f"unet.out_channels: expected unet.in_channels ({config.unet.in_channels}: the UNet "
                         f"predicts the noise or v of its input), got {config.unet.out_channels}")
    try:
        unet = UNetConfig.from_dict(config.unet.to_dict())
        nnx.eval_shape(lambda: UNet(unet, rngs=nnx.Rngs(0)))
    except (TypeError, ValueError) as error:  # "groups: 7 must divide ...", an unknown key, ...
        raise ValueError(f"unet: {error}") from None
    # its check of the UNet's channels against the pixel patches' (a ValueError naming both)
    StableDiffusionConfig(unet=unet, vae=None, pixel_patch=config.pixel_patch, text_encoder=None)


def check_options(config) -> None:
    """`dtype`, `pixel_patch` and `unet` (`check_unet`), the loop's intervals and
    `keep_checkpoints`, `data.num_threads` and `data.prefetch`, `train`'s schedule and
    AdamW settings (`optim.check_optimizer`), `train.trainable`, `uncond_probability`,
    `schedule`, the evaluation's options (first used at the end of training) and
    `train.batch_size` (it must split over the mesh's batch axes): checked before training
    (and before the tokenizer it needs is trained), naming the config key."""
    layers.compute_dtype(config.dtype)
    check_unet(config)
    loop.check_loop_settings(config)
    loop.check_read_options(config.data)
    optim.check_optimizer(config.train, "train.")
    if config.eval.num_examples < 2 and config.eval.num_examples != pipeline.ALL_RECORDS:
        raise ValueError(f"eval.num_examples: expected at least 2 (each image is also compared with another "
                         f"image's reconstruction) or {pipeline.ALL_RECORDS} (all), got {config.eval.num_examples}")
    if tuple(config.train.trainable) != TRAINABLE:  # the text encoder gets no gradient: it would only decay
        raise ValueError(f"train.trainable: expected {TRAINABLE} (the CLIP text encoder stays the tokenizer "
                         f"run's, frozen), got {tuple(config.train.trainable)}")
    if not 0.0 <= config.uncond_probability <= 1.0:  # bernoulli would clip it silently
        raise ValueError(f"uncond_probability: expected a probability in [0, 1], got {config.uncond_probability}")
    e = config.eval
    if e.batch_size < 1:  # else the evaluator, built once the tokenizer is trained, says "batch_size: ..."
        raise ValueError(f"eval.batch_size: expected >= 1, got {e.batch_size}")
    if e.grid_examples < 1:  # else samples.png is a blank strip (0) or short of its last columns (< 0)
        raise ValueError(f"eval.grid_examples: expected >= 1, got {e.grid_examples}")
    if not np.isfinite(e.guidance_scale):
        raise ValueError(f"eval.guidance_scale: expected a finite number, got {e.guidance_scale}")
    schedule = noise_schedule(config)
    try:
        samplers.get(e.sampler).plan(schedule, e.num_steps)
    except ValueError as error:  # "sampler: ..." / "num_steps: ..."
        raise ValueError(f"eval.{error}") from None
    global_batches.check_batch_sizes(config, {"train.batch_size": config.train.batch_size})


def warn_if_guidance_is_untrained(config) -> None:
    """Logs a warning when `uncond_probability` is 0 while `eval.guidance_scale` > 1: classifier-free
    guidance then extrapolates from the empty prompt's estimate, which training never taught the UNet."""
    if config.uncond_probability == 0 and config.eval.guidance_scale > 1:
        logging.warning("uncond_probability is 0, so the UNet is never trained on the empty prompt, yet "
                        "eval.guidance_scale %g (> 1) guides the evaluation's samples by it (classifier-free "
                        "guidance); set uncond_probability > 0 (e.g. 0.1) or eval.guidance_scale to 1",
                        config.eval.guidance_scale)


def train(config, workdir: str) -> bool:
    """Trains the decoder into `workdir` (resuming), evaluates, exports to WORKDIR/export.
    Returns False if preempted."""
    with command_line.config_checks():
        check_options(config)
        run_config.write(workdir, config, RUN_DEFINING, RUN_PATHS)
    warn_if_guidance_is_untrained(config)
    trained = tokenizer_trainer.ensure_trained(config, workdir)
    if trained is None:  # the tokenizer's training was preempted
        return False
    tok_dir, tok_export, tok_config = trained
    mesh = parallel.make_mesh(config.mesh.to_dict())
    rules = config.axis_rules
    train_paths, eval_paths = tokenizer_trainer.run_dataset_paths(tok_config, tok_dir)  # its synthetic or own shards
    _, clip_tokenizer = tokenizer_trainer.text_tokenizers(tok_config, tok_dir)
    empty_ids = clip_tokenizer([""])[0][0]
    clip_config = CLIPTextConfig(**tok_config.clip_text.to_dict())
    sd_config = diffusion_config(config, clip_config, empty_ids)
    model = create_model(sd_config, tok_config, mesh, rules, layers.compute_dtype(config.dtype), config.seed)

    skipped = pipeline.SkipCounter()
    # The captions cleaned as the tokenizer run cleaned those its stage II distilled:
    # the UNet learns the prompts whose CLIP embeddings the codes are decoded into.
    process_caption = text.caption_processor(tok_config.data.caption_processor)
    example = pipeline.PixelExample(sd_config.image_size, clip_tokenizer, skipped, process_caption)
    train_iter = pipeline.train_iterator(train_paths, example, global_batch_size=config.train.batch_size,
                                         seed=config.seed, num_threads=config.data.num_threads,
                                         prefetch=config.data.prefetch)
    writer = reporting.MetricsWriter(workdir)
    evaluator = Evaluator(config, tok_export, eval_paths, clip_tokenizer, writer, workdir, skipped, process_caption)
    preemption = coordination.Preemption()
    try:
        done = loop.run_stage(
            name="decoder", model=model, trainable=loop.trainable_filter(model, (), config.train.trainable),
            loss_fn=diffusion_loss(sd_config.schedule, config.uncond_probability, empty_ids), stage=config.train,
            config=config, mesh=mesh, train_iter=train_iter, evaluate=evaluator, writer=writer,
            preemption=preemption, checkpoint_dir=os.path.join(workdir, "checkpoints", "decoder"),
            counters={"data/skipped_records": skipped})
        if not done:
            return False
    finally:
        preemption.close()
        writer.close()
    out = os.path.join(workdir, "export")
    params = weights.gathered(weights.flat_params(model))  # on every process; then process 0 writes
    steps = checkpointing.trained_steps(os.path.join(workdir, "checkpoints"), [("decoder", "decoder")])

    coordination.export_and_mark_done(
        workdir, out, steps, lambda: weights.save(
            out, "stable_diffusion", sd_config, params,
            info={"workdir": workdir, "tokenizer_export": tok_export, "steps": steps,
                  "uncond_probability": config.uncond_probability}),
        done={"steps": steps["decoder"], "export": out, "tokenizer_export": tok_export})
    return True

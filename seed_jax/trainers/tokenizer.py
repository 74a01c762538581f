"""SEED tokenizer training: stage I (causal Q-Former, contrastive) then stage II
(quantiser, decode blocks and reverse Q-Former; 5 L_vq + 2 L_recon + 0.5 L_distill)."""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from seed_jax import command_line, parallel, weights
from seed_jax.api.checks import check_count, is_real
from seed_jax.data import pipeline, records, synthetic, text
from seed_jax.evaluators.codebook import codebook_usage
from seed_jax.evaluators.retrieval import recall_at_k
from seed_jax.models import layers, quantizer
from seed_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder
from seed_jax.models.tokenizer import SeedTokenizer, SeedTokenizerConfig
from seed_jax.trainers import checkpointing, coordination, global_batches, loop, optim, reporting, run_config
from seed_jax.trainers import warm_start as warm_start_lib

# What a run trained; a run resumed in its workdir may not change them (`run_config.write`).
# `init`: the exports the frozen parameters (ViT, CLIP text encoder) are read from, in
# training and when an export or a later trainer rebuilds the model from config.json.
RUN_DEFINING = ("trainer", "seed", "model", "clip_text", "init", "data.tokenizer", "data.max_text_length",
                "data.caption_processor", "data.synthetic", "stage1.trainable", "stage2.trainable")
# Those of them that name files or directories (compared as absolute paths).
RUN_PATHS = ("init", "data.tokenizer.vocab_file", "data.tokenizer.clip_vocab_file", "data.tokenizer.clip_merges_file")


class TrainModel(nnx.Module):
    """The tokenizer plus the frozen CLIP text encoder that defines stage II's targets."""

    def __init__(self, tokenizer: SeedTokenizerConfig, clip_text: CLIPTextConfig, *, dtype, remat: bool,
                 rngs: nnx.Rngs):
        self.tokenizer = SeedTokenizer(tokenizer, dtype=dtype, remat=remat, rngs=rngs)
        self.clip_text = CLIPTextEncoder(clip_text, dtype=dtype, rngs=rngs)


ITC_GRADIENTS = ("global", "lavis")


def contrastive_loss(image_features, text_features, temperature, label_smoothing, gradient: str = "global"):
    """Symmetric InfoNCE over the (global) batch with label smoothing; (B,F) each.
    `gradient` "global": the gradient of this loss. "lavis": LAVIS's (SEED's stage I under
    torch.distributed, which SEED trained with): the features gathered from every device
    carry no gradient, so image->text logits reach the image features alone and
    text->image logits the text features alone; the same loss value, and the same
    temperature gradient."""
    if gradient not in ITC_GRADIENTS:
        raise ValueError(f"itc_gradient: expected one of {ITC_GRADIENTS}, got {gradient!r}")
    lavis = gradient == "lavis"
    image_to_text = image_features @ (jax.lax.stop_gradient(text_features) if lavis else text_features).T / temperature
    labels = optax.smooth_labels(jnp.eye(image_to_text.shape[0]), label_smoothing)
    image_loss = optax.softmax_cross_entropy(image_to_text, labels).mean()
    # "global" traces as it did before the option: its train step compiles to the same program
    text_to_image = (text_features @ jax.lax.stop_gradient(image_features).T / temperature if lavis
                     else image_to_text.T)
    loss = (image_loss + optax.softmax_cross_entropy(text_to_image, labels).mean()) / 2
    accuracy = jnp.mean(jnp.argmax(image_to_text, axis=1) == jnp.arange(image_to_text.shape[0]))
    return loss, accuracy


def stage1_loss(label_smoothing: float, itc_gradient: str = "global"):
    def loss_fn(model: TrainModel, batch, rng):
        r_image, r_text = jax.random.split(rng)
        tok = model.tokenizer
        causal = tok.causal_embeddings(batch["image"], rng=r_image)
        loss, accuracy = contrastive_loss(tok.image_features(causal),
                                          tok.text_features(batch["text_ids"], batch["text_mask"], rng=r_text),
                                          tok.temp[...], label_smoothing, itc_gradient)
        return loss, ({"itc_loss": loss, "itc_accuracy": accuracy, "temperature": tok.temp[...]}, {})

    return loss_fn


def clamp_temperature(params, aux, rng, step):
    """post_update for stage I: keep the temperature in [0.001, 0.5], the bounds BLIP (v1)
    clamps it to before each forward pass (LAVIS's BLIP-2 and SEED's stage I divide by it
    unclamped; from 0.07 the bounds are not reached in practice). A temperature left out
    of `stage1.trainable` is not among `params`: it stays as it is."""
    del aux, rng, step
    if "temp" not in params["tokenizer"]:
        return params
    temp = params["tokenizer"]["temp"]
    temp[...] = jnp.clip(temp[...], 0.001, 0.5)
    return params


def stage2_losses(model: TrainModel, image, clip_ids, rng=None) -> tuple[dict, dict]:
    """({L_vq, L_recon = 1 - cos(reconstruction, causal embedding), L_distill = MSE to
    the CLIP text output}, {quant_input, codes}). `rng` enables the dropout of both
    Q-Formers: SEED's stage II runs its frozen causal Q-Former without gradients but in
    train mode, so its dropout is on in the embeddings quantised and reconstructed."""
    tok = model.tokenizer
    r_causal, r_generation = layers.split_rng(rng, 2)
    causal = jax.lax.stop_gradient(tok.causal_embeddings(image, rng=r_causal)).astype(jnp.float32)
    quant = tok.quantize_embeddings(causal)
    recon = tok.reconstruct(quant["quantized"]).astype(jnp.float32)
    cosine = jnp.sum(recon * causal, -1) / (
        jnp.maximum(jnp.linalg.norm(recon, axis=-1) * jnp.linalg.norm(causal, axis=-1), 1e-8))
    target = jax.lax.stop_gradient(model.clip_text(clip_ids))
    tokens = recon if not tok.config.recon_head else tok.generation_tokens(quant["quantized"])
    generated = tok.generation_embeddings(tokens, rng=r_generation)
    losses = {"vq_loss": quant["loss"], "recon_loss": jnp.mean(1.0 - cosine),
              "distill_loss": jnp.mean(jnp.square(generated - target))}
    return losses, {"quant_input": quant["quant_input"], "codes": quant["codes"]}


def stage2_loss(weights):
    def loss_fn(model: TrainModel, batch, rng):
        parts, aux = stage2_losses(model, batch["image"], batch["clip_ids"], rng)
        loss = (weights.vq * parts["vq_loss"] + weights.recon * parts["recon_loss"]
                + weights.distill * parts["distill_loss"])
        return loss, (parts, aux)

    return loss_fn


def restart_unused_codes(every: int, until_step: int):
    """post_update for stage II: every `every` steps before `until_step`, codes this
    batch left unused restart at random encoder outputs of the batch."""

    def post_update(params, aux, rng, step):
        codebook = params["tokenizer"]["quantize"]["codebook"]
        restarted = quantizer.restart_unused_codes(codebook[...], aux["quant_input"], aux["codes"], rng)
        codebook[...] = jnp.where((step % every == 0) & (step <= until_step), restarted, codebook[...])
        return params

    return post_update


def stage_batch_size(config, name: str) -> int:
    """The global batch size of stage `name`: its own `batch_size`, else `config.batch_size`."""
    return config[name].batch_size or config.batch_size


def stage_functions(config, name: str) -> tuple:
    """(loss_fn, post_update or None) of stage `name` ("stage1" or "stage2") for `loop.run_stage`."""
    if name == "stage1":
        return stage1_loss(config.label_smoothing, config.itc_gradient), clamp_temperature
    if name != "stage2":
        raise ValueError(f"stage: expected 'stage1' or 'stage2', got {name!r}")
    restart = config.stage2.restart_unused_codes_every
    until = int(config.stage2.restart_until * config.stage2.num_steps)
    return stage2_loss(config.loss_weights), restart_unused_codes(restart, until) if restart else None


def trainable(model: TrainModel, stage, field: str = "trainable") -> Callable:
    """nnx filter of the parameters `stage` (a stage config) trains: `stage.trainable` of
    the tokenizer (a missing name is an error naming the config `field`)."""
    return loop.trainable_filter(model, ("tokenizer",), stage.trainable, field)


# The tokenizer's modules each loss's gradient reaches. Stage II's causal embeddings
# carry none back; the straight-through estimator passes L_recon's and L_distill's to
# encode_task_layer but not to the codebook. L_recon runs through the reconstruction head
# (`model.recon_head`), else through the generation path's pos_embed_text + blocks_text.
# tests/test_train.py checks this table against a tiny model's gradients.
LOSS_REACHES = {
    "itc": ("visual_encoder", "ln_vision", "qformer", "vision_proj", "text_proj", "temp"),
    "vq": ("encode_task_layer", "quantize"),
    "recon": ("encode_task_layer", "decode_task_layer"),
    "distill": ("encode_task_layer", "decode_task_layer", "pos_embed_text", "blocks_text", "reverse_qformer",
                "distill_text_proj"),
}


def stage_losses_reach(config, stage: str) -> dict[str, tuple[str, ...]]:
    """Loss -> the tokenizer's modules its gradient reaches (`LOSS_REACHES`), for each loss
    of `stage`: stage I's contrastive loss, or stage II's three, whatever their weights."""
    if stage == "stage1":
        return {"itc": LOSS_REACHES["itc"]}
    head = ("pos_embed", "blocks") if config.model.recon_head else ("pos_embed_text", "blocks_text")
    return {"vq": LOSS_REACHES["vq"], "recon": LOSS_REACHES["recon"] + head, "distill": LOSS_REACHES["distill"]}


def check_trainable(config, prefix: str = "") -> None:
    """Raises naming the field (after `prefix`) unless each stage to run names modules of
    the tokenizer in its `trainable` (checked on the model's shapes: stage II's were first
    read when it began, after all of stage I, and as they define the run the workdir then
    refused a corrected name), each reached by the gradient of a loss the stage trains with
    (`stage_losses_reach`; stage II's with weight > 0): one no loss reaches would only
    shrink under AdamW's weight decay."""
    graphdef, abstract, _ = build_model(config)
    model = nnx.merge(graphdef, abstract)
    for name in stages_to_run(config):
        field = f"{prefix}{name}.trainable"
        trainable(model, config[name], field)
        every = stage_losses_reach(config, name)
        reaches = {loss: modules for loss, modules in every.items() if name == "stage1" or config.loss_weights[loss]}
        unreached = [m for m in config[name].trainable if not any(m in modules for modules in reaches.values())]
        if unreached:
            losses = "; ".join(f"{loss} reaches {list(modules)}" for loss, modules in reaches.items())
            off = [f"{prefix}loss_weights.{loss}" for loss, modules in every.items()
                   if loss not in reaches and set(unreached) & set(modules)]
            raise ValueError(f"{field}: {unreached} get no gradient in {name} ({losses}): they would not learn, "
                             f"only shrink under AdamW's weight decay; drop them from {field}"
                             + (f", or set {' or '.join(off)} > 0" if off else ""))


def batch_sizes(config) -> dict[str, int]:
    """Config field -> global batch size, for each batch the run shards over the mesh:
    each stage's (its own `batch_size`, else the global one) and the evaluation's."""
    sizes = {f"{name}.batch_size" if config[name].batch_size else "batch_size": stage_batch_size(config, name)
             for name in stages_to_run(config)}
    return {**sizes, "eval.batch_size": config.eval.batch_size}


def check_config(config, prefix: str = "") -> None:
    """Raises, naming the fields (after `prefix`: "tokenizer." for the decoder's or
    SEED-OPT's nested `config.tokenizer`), for settings that cannot run, before the data is made:
    an unknown `dtype` or `itc_gradient`, the loop's intervals and `keep_checkpoints`, `data.num_threads` and
    `data.prefetch` (`loop.check_read_options`), a batch size that does
    not split over the mesh's batch axes (`batch_sizes`); restarting unused
    codes edits the codebook, so it must be among what stage II trains, and it happens
    only in the first `restart_until` fraction of stage II, so that must be in (0, 1]; a
    reconstruction head (`model.recon_head`) trains in stage II unless `init.stage1` gives it;
    shard folders are read only with `data.source='array_record'`, the shapes world's
    settings are in range (`check_data_source`); `data.max_text_length` (`check_text_length`);
    `data.crop_scale` is a (min, max) area fraction (`check_crop_scale`); `label_smoothing`,
    `loss_weights` and `model.init_temperature` are in range (`check_loss_settings`);
    L_distill's two sides have one shape (`check_distill_shapes`); each stage's
    learning-rate schedule and AdamW settings (`optim.check_optimizer`);
    each stage's `trainable` names modules of the tokenizer (`check_trainable`)."""
    layers.compute_dtype(config.dtype, field=f"{prefix}dtype")
    if config.itc_gradient not in ITC_GRADIENTS:
        raise ValueError(f"{prefix}itc_gradient: expected one of {ITC_GRADIENTS}, got {config.itc_gradient!r}")
    check_data_source(config.data, prefix)
    check_text_length(config, prefix)
    check_crop_scale(config.data.crop_scale, prefix)
    check_distill_shapes(config, prefix)
    check_loss_settings(config, prefix)
    for name in stages_to_run(config):
        optim.check_optimizer(config[name], f"{prefix}{name}.")
    loop.check_loop_settings(config, prefix)
    loop.check_read_options(config.data, prefix)
    stage2, every = f"{prefix}stage2", config.stage2.restart_unused_codes_every
    if not isinstance(every, int) or every < 0:
        raise ValueError(f"{stage2}.restart_unused_codes_every: expected an integer >= 0 (0 = never), got {every!r}")
    if every and "quantize" not in config.stage2.trainable:
        raise ValueError(f"{stage2}.restart_unused_codes_every={every} restarts codes of the codebook, but 'quantize' "
                         f"is not in {stage2}.trainable {tuple(config.stage2.trainable)}: add it, or set "
                         "restart_unused_codes_every=0")
    head = [name for name in ("pos_embed", "blocks") if name not in config.stage2.trainable]
    if config.model.recon_head and head and not config.init.stage1:
        raise ValueError(f"{prefix}model.recon_head: L_recon reads its own head, but {', '.join(head)} is not in "
                         f"{stage2}.trainable {tuple(config.stage2.trainable)}: it would stay at its random init; "
                         f"train it (configs/tokenizer.py STAGE2_TRAINABLE) or set {prefix}model.recon_head=False")
    until = config.stage2.restart_until
    if not is_real(until) or not 0 <= until <= 1:  # above 1 ran as 1: all of stage II
        raise ValueError(f"{stage2}.restart_until: expected the fraction of stage II's steps in which unused codes "
                         f"restart, in [0, 1], got {until!r}")
    if every and not until > 0:
        raise ValueError(f"{stage2}.restart_unused_codes_every={every} restarts codes only in the first "
                         f"{stage2}.restart_until fraction of stage II, but restart_until is {until!r}: no step would "
                         "restart codes; set restart_until in (0, 1] (e.g. 0.3), or restart_unused_codes_every=0")
    global_batches.check_batch_sizes(config, batch_sizes(config), prefix)
    check_trainable(config, prefix)


def check_loss_settings(config, prefix: str = "") -> None:
    """Raises naming the field (after `prefix`) unless `label_smoothing` is in [0, 1) (at 1
    stage I's targets are uniform: nothing to learn), `model.init_temperature` (stage I
    divides its logits by it) is finite and > 0, and each of `loss_weights` (stage II's
    loss) is finite and >= 0, not all 0. Each trained on out of range, without an error."""
    smoothing = config.label_smoothing
    if not is_real(smoothing) or not 0 <= smoothing < 1:
        raise ValueError(f"{prefix}label_smoothing: expected a fraction in [0, 1) (0 = none), got {smoothing!r}")
    temperature = config.model.init_temperature
    if not is_real(temperature) or not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{prefix}model.init_temperature: expected a finite number > 0 (e.g. 0.07), "
                         f"got {temperature!r}")
    for name, weight in config.loss_weights.items():
        if not is_real(weight) or not np.isfinite(weight) or weight < 0:
            raise ValueError(f"{prefix}loss_weights.{name}: expected a finite number >= 0, got {weight!r}")
    if not any(config.loss_weights.values()):
        raise ValueError(f"{prefix}loss_weights: all are 0 ({dict(config.loss_weights)}): stage II would train "
                         "nothing; expected at least one > 0")


def check_distill_shapes(config, prefix: str = "") -> None:
    """L_distill is the MSE between the reverse Q-Former's (num_queries, generation_width)
    output and the CLIP text encoder's (max_length, width): unequal, stage II failed with
    a bare broadcasting error once all of stage I had trained (or, a side of size 1,
    broadcast silently). Raises naming the fields after `prefix`."""
    m, clip = config.model, config.clip_text
    ours = (m.reverse_qformer.num_queries, m.generation_width)
    if ours != (clip.max_length, clip.width):
        raise ValueError(f"{prefix}model.reverse_qformer.num_queries, {prefix}model.generation_width {ours}: "
                         f"expected those of the CLIP text output stage II distils into, {prefix}clip_text.max_length, "
                         f"{prefix}clip_text.width {(clip.max_length, clip.width)}")


# ---------------------------------------------------------------- data
def check_data_source(data, prefix: str = "") -> None:
    """`data.source` is one `dataset_paths` reads; shard folders (`data.train_dir`,
    `data.eval_dir`) given with the synthetic shapes world, which reads none, are
    refused rather than ignored (the demo presets' source is 'synthetic'), whose
    `data.synthetic` counts must be >= 1 and seed >= 0 (they failed naming no field, or as
    a traceback for `num_train` 0). Errors name the fields after `prefix`."""
    source = f"{prefix}data.source"
    if data.source not in ("synthetic", "array_record"):
        raise ValueError(f"{source}: expected 'synthetic' or 'array_record', got {data.source!r}")
    if data.source == "synthetic":
        for name in ("num_train", "num_eval", "image_size", "num_shards", "seed"):
            check_count(f"{prefix}data.synthetic.{name}", data.synthetic[name], 0 if name == "seed" else 1)
    given = [f"{prefix}data.{name}={data[name]!r}" for name in ("train_dir", "eval_dir") if data[name]]
    if data.source == "synthetic" and given:
        raise ValueError(f"{', '.join(given)}: {source} is 'synthetic' (the shapes world, written to "
                         f"WORKDIR/data), which reads no shards; add --config.{source}=array_record to "
                         "train on them")


def check_text_length(config, prefix: str = "") -> None:
    """`data.max_text_length` (named after `prefix`) holds [CLS] and [SEP] (below 2 the
    tokenizer cut nothing and padded nothing: batches of captions of unequal lengths failed
    in grain) and fits the Q-Former's `max_positions` (beyond, the first train step failed
    naming input_ids, not the field)."""
    field, positions = f"{prefix}data.max_text_length", config.model.qformer.max_positions
    length = check_count(field, config.data.max_text_length, 2, "[CLS] and [SEP] at least")
    if length > positions:
        raise ValueError(f"{field}: {length} exceeds {prefix}model.qformer.max_positions {positions}, the caption "
                         "positions the Q-Former holds")


def check_crop_scale(scale, prefix: str = "") -> None:
    """`data.crop_scale` (named after `prefix`) is the (min, max) fraction of an image's
    area a training crop covers, 0 < min <= max <= 1: one number was taken as (it, 1.0),
    three failed in the data workers, and fractions above 1 fell back to the centre crop
    at every draw."""
    scale, field = tuple(scale), f"{prefix}data.crop_scale"
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scale)
    if len(scale) != 2 or not numbers or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"{field}: expected (min, max) fractions of the image's area, 0 < min <= max <= 1 "
                         f"(e.g. --config.{field}=\"(0.8, 1.0)\"), got {scale}")


def dataset_paths(config, workdir, prefix: str = "") -> tuple[list[str], list[str]]:
    """(train, eval) shards of the tokenizer run of `config` in `workdir`: the synthetic
    shapes in WORKDIR/data (written there unless already written), else `data.train_dir`
    / `data.eval_dir` (a folder without them is a ConfigError naming the field after
    `prefix`). The decoder trains on the same splits."""
    d = config.data
    if d.source == "synthetic":
        directory = os.path.join(workdir, "data")
        s = d.synthetic
        if jax.process_index() == 0:
            for split, n in (("train", s.num_train), ("eval", s.num_eval)):
                synthetic.write_shapes_dataset(directory, split=split, num_examples=n, seed=s.seed,
                                               image_size=s.image_size, num_shards=s.num_shards)
        multihost_utils.sync_global_devices("shapes_world_written")
        return records.shard_paths(directory, "train"), records.shard_paths(directory, "eval")
    with command_line.config_checks():
        check_data_source(d, prefix)
        train = records.shard_paths(d.train_dir, d.train_prefix, f"{prefix}data.train_dir")
        evaluated = records.shard_paths(d.eval_dir, d.eval_prefix, f"{prefix}data.eval_dir")
    shared = sorted({os.path.realpath(p) for p in train} & {os.path.realpath(p) for p in evaluated})
    if shared:  # e.g. both splits left at make_records' default prefix, train
        logging.warning("%sdata.train_dir/train_prefix and %sdata.eval_dir/eval_prefix share %d of their shards "
                        "(%s...): the run is evaluated on images it trains on", prefix, prefix, len(shared), shared[0])
    return train, evaluated


def run_dataset_paths(config, workdir: str) -> tuple[list[str], list[str]]:
    """`dataset_paths` of the finished tokenizer run in `workdir` (`config`: its config.json),
    for the trainers that read its images: shards no longer where the run read them are a
    ConfigError naming the run."""
    try:
        return dataset_paths(config, workdir)
    except command_line.ConfigError as error:
        raise command_line.ConfigError(f"the tokenizer run in {workdir} (its config.json): {error}; its images "
                                       "are read from there: put them back") from error


def text_tokenizers(config, workdir, prefix: str = "") -> tuple[text.TextTokenizer, text.TextTokenizer]:
    """(Q-Former caption tokenizer, CLIP text tokenizer); an unknown `data.tokenizer.kind`
    is named after `prefix`."""
    t = config.data.tokenizer
    clip_length = config.clip_text.max_length
    if t.kind == "wordpiece_grammar":
        path = os.path.join(workdir, "tokenizer.json")
        if jax.process_index() == 0 and not os.path.exists(path):
            text.grammar_wordpiece(synthetic.caption_vocabulary()).save(path)
        multihost_utils.sync_global_devices("tokenizer_ready")
        wordpiece = text.tokenizers.Tokenizer.from_file(path)
        pad = wordpiece.token_to_id("[PAD]")
        return (text.TextTokenizer(wordpiece, config.data.max_text_length, pad),
                text.TextTokenizer(wordpiece, clip_length, pad))
    if t.kind == "bert_vocab":
        bert = text.bert_wordpiece(t.vocab_file, f"{prefix}data.tokenizer.vocab_file")
        clip = text.clip_bpe(t.clip_vocab_file, t.clip_merges_file, f"{prefix}data.tokenizer.")
        return (text.TextTokenizer(bert, config.data.max_text_length, bert.token_to_id("[PAD]")),
                text.TextTokenizer(clip, clip_length, clip.token_to_id("<|endoftext|>")))
    raise ValueError(f"{prefix}data.tokenizer.kind: expected 'wordpiece_grammar' or 'bert_vocab', got {t.kind!r}")


# ---------------------------------------------------------------- evaluation
class Evaluator:
    """Retrieval recall@K (causal embeddings; in stage II also from the codes) and
    codebook usage on the held-out split.

    Each image is encoded once, from the first of its records whose image decodes (a
    COCO image's 5 captions are 5 records): `image_batches` hold one row per image,
    `caption_batches` every record's caption, `captions` / `images` each record's caption
    and `records.image_id` (see `eval_inputs`). Every record is then scored with its
    image's features, as when each record's image was encoded: the metrics are those of
    all records, but codebook usage, which counts each image's codes once. A record whose
    image was tried and did not decode is left out (and counted as skipped), as before;
    the images of the records after the encoded one are not decoded. The batches' first
    pass, which counts the skipped records, is made here, before a resumed run sets its
    counts to those it saved: made at the first evaluation, it counted them again where
    the saved counts held them (a checkpoint taken after an evaluation)."""

    def __init__(self, model: TrainModel, image_batches, caption_batches, captions, images, mesh, rules):
        for batches in (image_batches, caption_batches):
            for _ in batches:
                pass
        self.image_batches, self.caption_batches = image_batches, caption_batches
        self.captions, self.images = captions, images
        self.first_record = pipeline.first_record_of_image(images)
        self.mesh, self.rules = mesh, rules
        self.num_codes = model.tokenizer.config.num_codes
        graphdef = nnx.graphdef(model)

        def image_features(state, batch, with_codes: bool):
            with parallel.axis_rules(mesh, rules):
                tok = nnx.merge(graphdef, state).tokenizer
                causal = tok.causal_embeddings(batch["image"])
                out = {"image": tok.image_features(causal), "index": batch["index"]}
                if with_codes:
                    codes = tok.quantize.nearest(tok.encode_task_layer(causal))
                    out["codes"] = codes
                    out["image_from_codes"] = tok.image_features(tok.reconstruct(tok.quantize.lookup(codes)))
                return out

        def text_features(state, batch):
            with parallel.axis_rules(mesh, rules):
                tok = nnx.merge(graphdef, state).tokenizer
                return {"text": tok.text_features(batch["text_ids"], batch["text_mask"]), "index": batch["index"]}

        self.image_features = jax.jit(image_features, static_argnums=2)
        self.text_features = jax.jit(text_features)

    def _features(self, fn, batches, keys: tuple[str, ...], *args) -> dict[str, np.ndarray]:
        """`fn(batch, *args)` over `batches` (their `keys`), gathered on the host; the rows
        of records only (index >= 0)."""
        parts = [fn(global_batches.global_batch({k: b[k] for k in keys}, self.mesh, self.rules), *args)
                 for b in batches]
        host = {k: np.concatenate([global_batches.to_host(p[k]) for p in parts]) for k in parts[0]}
        valid = host["index"] >= 0
        return {k: v[valid] for k, v in host.items()}

    def image_rows(self, encoded: np.ndarray, records: np.ndarray) -> np.ndarray:
        """For each of `records`, the row of its image among the `encoded` records (the
        image pass's indices, one record an image), -1 where none of its image's records
        decoded or it comes before its image's encoded record (its image was tried and
        did not decode)."""
        image_of = self.first_record  # an image is named by its first record
        rows = np.full(len(image_of), -1)
        rows[image_of[encoded]] = np.arange(len(encoded))
        encoded_record = np.full(len(image_of), len(image_of))
        encoded_record[image_of[encoded]] = encoded
        image = image_of[records]
        return np.where(records >= encoded_record[image], rows[image], -1)

    def __call__(self, model: TrainModel, step: int, stage: str) -> dict[str, float]:
        with_codes = stage == "stage2"
        state = nnx.state(model)
        image = self._features(lambda b: self.image_features(state, b, with_codes), self.image_batches,
                               ("image", "index"))
        text = self._features(lambda b: self.text_features(state, b), self.caption_batches,
                              ("text_ids", "text_mask", "index"))
        rows = self.image_rows(image["index"], text["index"])
        paired = rows >= 0
        index, rows = text["index"][paired], rows[paired]
        texts = text["text"][paired]
        captions = [self.captions[i] for i in index]
        images = [self.images[i] for i in index]
        metrics = {f"retrieval/{k}": v for k, v in
                   recall_at_k(image["image"][rows], texts, captions, images=images).items()}
        if with_codes:
            metrics.update({f"retrieval_codes/{k}": v for k, v in
                            recall_at_k(image["image_from_codes"][rows], texts, captions, images=images).items()})
            metrics.update({f"codebook/{k}": v for k, v in  # each image's codes once, however many captions
                            codebook_usage(image["codes"][np.unique(rows)], self.num_codes).items()})
        metrics["num_examples"] = float(len(index))
        logging.info("%s eval at step %d: %s", stage, step,
                     " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "r1" in k or "codebook" in k))
        return metrics


def eval_inputs(paths, example: pipeline.Example, config, prefix: str = "") -> tuple:
    """(image batches, caption batches, captions, images) of `Evaluator` for the first
    `config.eval.num_examples` records of the eval split `paths`: the image batches hold
    one row per image (by `records.image_id`), the first of its records whose image
    decodes, the caption batches all; the captions cleaned as `example` cleans them
    (retrieval compares them so: captions differing only before cleaning are one text).
    Raises naming the split when no record's image decodes (retrieval over no pairs is
    NaN); errors name eval.num_examples after `prefix`."""
    e = config.eval
    captions, images = zip(*pipeline.read_labels(paths, e.num_examples, prefix))
    captions = tuple(None if c is None else example.process_caption(c) for c in captions)
    image_records = pipeline.records_of_images(images)
    if not image_records:
        raise ValueError(f"{paths[0]}...: none of the eval split's first {len(images)} records decodes "
                         f"({prefix}eval.num_examples)")
    why = pipeline.why_no_image_decodes(paths, [i for group in image_records for i in group])
    if why is not None:
        raise ValueError(f"{paths[0]}...: none of the eval split's first {len(images)} records holds an image that "
                         f"decodes (the first: {why}; {prefix}eval.num_examples)")
    batches = dict(global_batch_size=e.batch_size, num_threads=config.data.num_threads)
    return (pipeline.eval_batches(paths, example, num_examples=e.num_examples, record_groups=image_records,
                                  **batches),
            pipeline.eval_batches(paths, pipeline.CaptionExample(example.text, example.skipped,
                                                                 example.process_caption),
                                  num_examples=e.num_examples, **batches),
            captions, images)


# ---------------------------------------------------------------- driver
def make_example(config, qformer_text: text.TextTokenizer, clip_text: text.TextTokenizer,
                 skipped: pipeline.SkipCounter) -> pipeline.Example:
    """The `pipeline.Example` of `config.data`: its crop, flip and caption processor."""
    d = config.data
    return pipeline.Example(config.model.vit.image_size, qformer_text, clip_text, skipped, tuple(d.crop_scale),
                            d.flip, text.caption_processor(d.caption_processor))


def build_model(config):
    """(graphdef, abstract state, create) for the TrainModel of `config`; `create()`
    builds it with initial weights (call it under jit with out_shardings to
    initialise directly into a mesh)."""
    tokenizer_config = SeedTokenizerConfig.from_dict(config.model.to_dict())
    clip_config = CLIPTextConfig(**config.clip_text.to_dict())
    dtype = layers.compute_dtype(config.dtype)

    def create():
        return TrainModel(tokenizer_config, clip_config, dtype=dtype, remat=config.remat,
                          rngs=nnx.Rngs(config.seed))

    graphdef, abstract = nnx.split(nnx.eval_shape(create))
    return graphdef, abstract, create


def warm_start(model: TrainModel, config, shardings) -> None:
    """Loads `config.init.*` exports into the sharded model: `qformer` (a converted
    BLIP-2: ViT, ln_vision, Q-Former, heads) and `stage1` (a stage-I tokenizer export)
    into the tokenizer (all but what stage II trains), `clip_text` into the CLIP text encoder."""
    init = config.init
    if init.qformer and init.stage1:
        raise ValueError("config.init: set either qformer (start stage I) or stage1 (start stage II), not both")
    tokenizer = weights.flat_shardings(shardings["tokenizer"])
    image_path = ("visual_encoder", "ln_vision", "qformer.query_tokens", "qformer.embed_norm", "qformer.groups")
    if init.qformer:
        warm_start_lib.load_into(model.tokenizer, init.qformer, kinds=("blip2",), shardings=tokenizer,
                                 require=image_path)
    if init.stage1:  # what stage II trains starts afresh, so its shapes may differ from the export's
        warm_start_lib.load_into(model.tokenizer, init.stage1, kinds=("seed_tokenizer",), shardings=tokenizer,
                                 require=image_path, skip=tuple(config.stage2.trainable))
    _warm_start_clip_text(model.clip_text, init.clip_text, shardings["clip_text"])


def _warm_start_clip_text(clip_text: CLIPTextEncoder, export: str, shardings) -> None:
    """Loads `config.init.clip_text` (a converted CLIP text encoder; "" = keep the random weights)."""
    if export:
        warm_start_lib.load_into(clip_text, export, kinds=("clip_text",), require_all=True,
                                 shardings=weights.flat_shardings(shardings))


def create_model(config, mesh) -> TrainModel:
    """The TrainModel initialised straight into its shardings, then warm-started."""
    graphdef, abstract, create = build_model(config)
    shardings = parallel.state_shardings(abstract, mesh, config.axis_rules)
    model = nnx.merge(graphdef, jax.jit(lambda: nnx.state(create()), out_shardings=shardings)())
    warm_start(model, config, shardings)
    return model


def create_clip_text(config, mesh) -> CLIPTextEncoder:
    """`create_model(config, mesh).clip_text` (the same random weights, or
    `config.init.clip_text`) without initialising the tokenizer: its initialisers are
    traced, to draw the same keys, but dropped before compiling."""
    graphdef, abstract, create = build_model(config)
    shardings = parallel.state_shardings(abstract, mesh, config.axis_rules)["clip_text"]
    state = jax.jit(lambda: nnx.state(create().clip_text), out_shardings=shardings)()
    clip_text = nnx.merge(nnx.graphdef(nnx.merge(graphdef, abstract).clip_text), state)
    _warm_start_clip_text(clip_text, config.init.clip_text, shardings)
    return clip_text


def stages_to_run(config) -> tuple[str, ...]:
    """Stage I is skipped when training starts from a stage-I export."""
    return ("stage2",) if config.init.stage1 else ("stage1", "stage2")


def train(config, workdir: str, prefix: str = "") -> bool:
    """Runs stage I then stage II into `workdir`, resuming whatever is there.
    Returns False if preempted (a checkpoint was saved), True when both stages are done.
    The errors of its checks name the config's fields after `prefix`: "tokenizer." when
    `config` is the decoder's or SEED-OPT's `config.tokenizer` (`ensure_trained`)."""
    with command_line.config_checks():
        check_config(config, prefix)
        run_config.check(workdir, config, RUN_DEFINING, RUN_PATHS, prefix)
        checkpointing.check_stage_order(os.path.join(workdir, "checkpoints"), [
            (name, f"{prefix}{name}", config[name].num_steps) for name in stages_to_run(config)],
            run_config.new_workdir_flag(prefix))
        run_config.write(workdir, config, RUN_DEFINING, RUN_PATHS, prefix)
    _unmark_done_while_steps_remain(workdir, config)
    mesh = parallel.make_mesh(config.mesh.to_dict())
    rules = config.axis_rules
    logging.info("mesh %s on %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())

    with command_line.config_checks():  # the shards, text tokenizers and eval split the settings name
        train_paths, eval_paths = dataset_paths(config, workdir, prefix)
        qformer_text, clip_text = text_tokenizers(config, workdir, prefix)
        for name, tok, size in (("model.qformer.vocab_size", qformer_text, config.model.qformer.vocab_size),
                                ("clip_text.vocab_size", clip_text, config.clip_text.vocab_size)):
            if tok.vocab_size > size:
                raise ValueError(f"{prefix}{name} {size} is smaller than its tokenizer's vocabulary "
                                 f"({tok.vocab_size})")
        skipped = pipeline.SkipCounter()
        example = make_example(config, qformer_text, clip_text, skipped)
        evaluation = eval_inputs(eval_paths, example, config, prefix)
    model = create_model(config, mesh)

    writer = reporting.MetricsWriter(workdir)
    evaluator = Evaluator(model, *evaluation, mesh, rules)
    preemption = coordination.Preemption()
    try:
        for name in stages_to_run(config):
            loss_fn, post_update = stage_functions(config, name)
            train_iter = pipeline.train_iterator(train_paths, example,
                                                 global_batch_size=stage_batch_size(config, name),
                                                 seed=config.seed + (name == "stage2"),
                                                 num_threads=config.data.num_threads, prefetch=config.data.prefetch)
            done = loop.run_stage(
                name=name, model=model, trainable=trainable(model, config[name]),  # names checked by check_config
                loss_fn=loss_fn, stage=config[name], config=config, mesh=mesh, train_iter=train_iter,
                evaluate=lambda m, step, name=name: evaluator(m, step, name), writer=writer,
                preemption=preemption, checkpoint_dir=os.path.join(workdir, "checkpoints", name),
                counters={"data/skipped_records": skipped}, post_update=post_update)
            if not done:
                return False
    finally:
        preemption.close()
        writer.close()
    if jax.process_index() == 0:
        records.write_json(os.path.join(workdir, "DONE.json"),  # whole: `ensure_trained` takes any as finished
                           {f"{name}_steps": steps for name, steps in _trained_steps(workdir, config).items()})
    return True


def _trained_steps(workdir: str, config) -> dict[str, int]:
    """Stage name -> the step of its latest checkpoint in `workdir` (0: none)."""
    return checkpointing.trained_steps(os.path.join(workdir, "checkpoints"),
                                       [(name, name) for name in stages_to_run(config)])


def _unmark_done_while_steps_remain(workdir: str, config) -> None:
    """A finished run resumed with more steps is unfinished until it has trained them:
    its DONE.json is removed (by process 0), so that a run preempted on the way is not
    taken as finished by `ensure_trained` and the evaluators, which export what it holds."""
    path = os.path.join(workdir, "DONE.json")
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    trained = _trained_steps(workdir, config)
    if any(trained[name] < config[name].num_steps for name in trained):
        os.remove(path)


# ---------------------------------------------------------------- for the trainers built on a tokenizer
# How the fields of a trainer's nested `config.tokenizer` are named on its command line
# (--config.tokenizer.KEY=VALUE) and so in the errors and warnings about them.
NESTED_PREFIX = "tokenizer."


def ensure_trained(config, workdir: str) -> tuple[str, str, ml_collections.ConfigDict] | None:
    """(tokenizer workdir, its export, its config) for a trainer whose config has
    `tokenizer` (a tokenizer config) and `tokenizer_workdir` ("" = WORKDIR/tokenizer):
    trains the tokenizer first, with `config.tokenizer`, if that workdir has no finished
    run, and exports it (again if the run was resumed with more steps since). A finished
    run is reused as it was trained: callers take its settings (text tokenizers, CLIP
    text encoder) from the returned config, which may differ from `config.tokenizer`
    (a warning names those that define the run, `warn_of_unused_settings`).
    None when that training was preempted (its checkpoint saved): the caller returns
    False, as a preempted run does."""
    directory = run_directory(config, workdir)
    if not os.path.exists(os.path.join(directory, "DONE.json")):
        logging.info("no finished tokenizer run in %s: training it first", directory)
        if not train(config.tokenizer, directory, NESTED_PREFIX):
            return None
    else:
        warn_of_unused_settings(config.tokenizer, directory)
    out, trained = export_finished_run(directory)
    return directory, out, trained


def run_directory(config, workdir: str) -> str:
    """The tokenizer run of a trainer's `config` in `workdir` (`ensure_trained`'s): its
    `tokenizer_workdir`, or WORKDIR/tokenizer, absolute."""
    return os.path.abspath(config.tokenizer_workdir or os.path.join(workdir, "tokenizer"))


def warn_of_unused_settings(settings: ml_collections.ConfigDict, directory: str) -> None:
    """Logs a warning listing each setting under RUN_DEFINING in which `settings` (a
    trainer's `config.tokenizer`) differ from those of the finished run in `directory`
    (compared as `run_config.write` compares them, paths absolute): the run is reused as
    it was trained, so a `--config.tokenizer.*` override of one of them goes unused."""
    changed = run_config.changed_settings(directory, settings, RUN_DEFINING, RUN_PATHS)
    if changed:
        logging.warning("the finished tokenizer run in %s is reused with the settings it was trained with, not the "
                        "config's, which differ (the run's value -> the given one: %s); to use the given ones, train "
                        "into another tokenizer_workdir (--config.tokenizer_workdir=DIR)",
                        directory, run_config.listed(changed, NESTED_PREFIX))


def export_finished_run(directory: str) -> tuple[str, ml_collections.ConfigDict]:
    """(DIRECTORY/export, the run's config) of the finished tokenizer run in `directory`,
    exported there unless it holds this run's export already (again when the run was
    resumed with more steps since)."""
    from seed_jax import export  # export reads tokenizer runs through this module

    out = os.path.join(directory, "export")
    trained = export.read_workdir_config(directory)
    if jax.process_index() == 0:
        weights.write_unless_current(out, {name: trained[name].num_steps for name in stages_to_run(trained)},
                                     lambda: export.export(directory, out))
    multihost_utils.sync_global_devices("tokenizer_exported")
    return out, trained

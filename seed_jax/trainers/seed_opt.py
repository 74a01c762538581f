"""SEED-OPT training: OPT learns to read and write SEED codes.

Data are code records (`trainers/pretokenize.py`): the demo pre-tokenizes its
tokenizer run's images itself; real runs point `config.data.codes_dir` at a
pre-tokenized corpus. Training has two phases, each a stage of the shared loop
(own checkpoints, resumable): image -> text only, then both directions
(`data/sequences.py` for the formats), on packed rows with next-token loss on the
answer part only. The demo trains a small OPT from scratch; `seed_opt_2.7b` loads a
converted OPT-2.7B (`convert hf_opt --image_tokens=8192`) and trains LoRA adapters
and the appended token rows. Training steps drop at the model's rates (`config.model`'s,
or the converted OPT's: its config.json's `dropout`, 0.1 in the released ones) and
`lora.dropout` on the adapters' inputs, each step of each phase with its own key
(`loop.step_key`: the phase's index and the step folded into `config.seed`); evaluation and
generation do not drop. Evaluation on held-out records: caption exact match
(greedy captions from codes) and text -> image retrieval (greedy codes from a
caption, 32 code tokens then </img>, scored through the tokenizer's code features).
The result is exported to WORKDIR/export with LoRA merged (`api.SeedOPT.load`).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from seed_jax import api, command_line, parallel, weights
from seed_jax import export as export_lib
from seed_jax.api.checks import check_count, is_real
from seed_jax.api import stable_diffusion
from seed_jax.api.seed_opt import new_token_room
from seed_jax.api.seed_tokenizer import codebook_digest, read_codes_export
from seed_jax.data import opt_text, pipeline, records, sequences, synthetic
from seed_jax.evaluators.caption_codes import caption_all, score_captions
from seed_jax.evaluators.code_retrieval import CodeRetrieval
from seed_jax.evaluators.reconstruction import image_grid
from seed_jax.models import layers, opt
from seed_jax.trainers import checkpointing, coordination, global_batches, loop, optim, pretokenize, reporting
from seed_jax.trainers import run_config
from seed_jax.trainers import tokenizer as tokenizer_trainer
from seed_jax.trainers import warm_start as warm_start_lib

PHASES = (("image_to_text", "phase1"), ("both_directions", "phase2"))
DROPOUT_RATES = ("dropout", "attention_dropout")  # the model's, from config.model or the converted OPT
# What a run trained; a run resumed in its workdir may not change them (`run_config.write`).
# `init`: the converted OPT whose frozen base weights the adapters and appended rows train on;
# `tokenizer_export` / `tokenizer_workdir`: the SEED tokenizer whose codes it reads and writes;
# `data.num_packing_bins`: the packed rows a phase's checkpointed data position counts in
# (restored into a packer of another bin count, it skipped other rows or failed in grain).
RUN_DEFINING = ("trainer", "seed", "model", "init", "lora", "image_embedding", "text_tokenizer", "prompts",
                "train_all", "tokenizer_export", "tokenizer_workdir", "data.num_packing_bins")
# Those of them that name files or directories (compared as absolute paths).
RUN_PATHS = ("init", "tokenizer_export", "tokenizer_workdir", "text_tokenizer.folder")


def lm_loss(model: opt.OPT, batch, rng):
    """Mean cross-entropy of the packed rows' targets (logits only at their positions);
    `rng` (the step's key, or None) is the model's dropout key."""
    logits, _ = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                      logits_at=batch["target_index"], dropout_rng=rng)
    mask = batch["target_mask"].astype(jnp.float32)
    # The target's logit picked by comparison, not gathered: a gather's gradient is a
    # scatter into a (B,K,V) buffer, a quarter of the demo's train step on CPU.
    is_target = jnp.arange(logits.shape[-1]) == batch["target_ids"][..., None]
    token_loss = jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    count = jnp.maximum(mask.sum(), 1.0)
    loss = (token_loss * mask).sum() / count
    accuracy = ((jnp.argmax(logits, -1) == batch["target_ids"]) * mask).sum() / count
    return loss, ({"token_accuracy": accuracy, "target_tokens": mask.sum()}, {})


# ---------------------------------------------------------------- text tokenizer and model
def text_tokenizer(config, workdir: str) -> opt_text.OPTTextTokenizer:
    """The text tokenizer `config.text_tokenizer` names; an unknown kind or missing BPE files
    are a ConfigError (`python -m seed_jax.main` prints it alone)."""
    t = config.text_tokenizer
    if t.kind == "word_bpe":  # the demo: the shapes captions' words and the prompts' words
        path = os.path.join(workdir, opt_text.FILE_NAME)
        if jax.process_index() == 0 and not os.path.exists(path):
            prompt_words = " ".join(config.prompts.values()).replace("{caption}", "").replace("{question}", "")
            words = synthetic.caption_vocabulary() + prompt_words.replace(":", " ").replace(".", " ").split()
            opt_text.word_bpe(words).save(path)
        multihost_utils.sync_global_devices("text_tokenizer_ready")
        return opt_text.OPTTextTokenizer.load(path)
    if t.kind == "gpt2_bpe":
        with command_line.config_checks():
            bpe = opt_text.gpt2_bpe(t.folder)
        return opt_text.OPTTextTokenizer(bpe)
    raise command_line.ConfigError(f"text_tokenizer.kind: expected 'word_bpe' or 'gpt2_bpe', got {t.kind!r}")


def check_config(config) -> None:
    """The model settings `train` reads only after the tokenizer and the codes are ready
    (training the demo tokenizer, pre-tokenizing: minutes to hours), checked up front:
    `dtype`, the loop's intervals and `keep_checkpoints`, `data.num_threads` and
    `data.prefetch`, `image_embedding`, `lora`, the dropout rates, the prompts' fields,
    `data.max_text_tokens`, each phase's `batch_size` (it must split over the mesh's batch
    axes), schedule and AdamW settings (`optim.check_optimizer`), `max_targets_per_row` and
    `text_to_image_fraction`, `data.num_packing_bins`,
    `eval.batch_size`, `max_caption_tokens`, `num_examples` and `num_samples`, with `tokenizer_export`
    `caption_tokenizer.caption_processor` and, when the tokenizer run's images are
    pre-tokenized here, distinct `data.train_prefix` and `data.eval_prefix`, else a
    ValueError naming them."""
    layers.compute_dtype(config.dtype)
    if not config.data.codes_dir and config.data.train_prefix == config.data.eval_prefix:
        # one prefix would name both splits' code shards: the eval images' codes replaced the train images'
        raise ValueError(f"data.train_prefix and data.eval_prefix: both {config.data.eval_prefix!r}; the tokenizer "
                         "run's train and eval images are pre-tokenized under them, so they must differ")
    sequences.Prompts(**config.prompts.to_dict())
    # 0 left every caption and generation prompt empty, a negative count cut their last tokens
    check_count("data.max_text_tokens", config.data.max_text_tokens, 1)
    loop.check_loop_settings(config)
    loop.check_read_options(config.data)
    if config.image_embedding not in ("rows", "codebook_projection"):
        raise ValueError(f"image_embedding: expected 'rows' or 'codebook_projection', got {config.image_embedding!r}")
    layers.check_rate("lora.dropout", config.lora.dropout)
    if config.lora.rank:
        layers.LoRA(config.lora.rank, config.lora.alpha, config.lora.targets)
    for name, rate in model_rates(config).items():
        layers.check_rate(f"model.{name}", rate)
    global_batches.check_batch_sizes(config, {f"{key}.batch_size": config[key].batch_size for _, key in PHASES})
    # evaluation captions the held-out records on every process, eval.batch_size rows at a time: any count
    # works, but 0 (or below) failed only at the first evaluation, after a phase's training
    check_count("eval.batch_size", config.eval.batch_size, 1)
    check_count("eval.max_caption_tokens", config.eval.max_caption_tokens, 1)  # as late: generate's max_new_tokens
    # read once the codes are made, naming num_examples (0 or a negative count), or a fraction read every record
    sequences.check_num_examples("eval.num_examples", config.eval.num_examples)
    # 0 failed at the first evaluation painting no images, a negative count saved all records but the last few
    check_count("eval.num_samples", config.eval.num_samples, 1)
    for _, key in PHASES:
        optim.check_optimizer(config[key], f"{key}.")
        # below, every sequence was skipped: grain's "100 % skipped" after the codes were made
        check_count(f"{key}.max_targets_per_row", config[key].max_targets_per_row, 2,
                    "an image -> text sequence has a caption token and </s> as targets, at least")
        fraction = config[key].text_to_image_fraction  # outside [0, 1], every sequence or none was text -> image
        if not is_real(fraction) or not 0 <= fraction <= 1:
            raise ValueError(f"{key}.text_to_image_fraction: expected the fraction of sequences that are text -> "
                             f"image, in [0, 1], got {fraction!r}")
    check_count("data.num_packing_bins", config.data.num_packing_bins, 1)  # 0 failed in grain, after the codes
    if config.tokenizer_export:
        caption_processor(config, None)


def model_rates(config) -> dict[str, float]:
    """The dropout rates `config.model` sets; with `init.opt` a rate left None takes the export's."""
    return {name: config.model.get(name) for name in DROPOUT_RATES
            if not (config.init.opt and config.model.get(name) is None)}


def model_config(config, text_vocab_size: int, num_codes: int, code_dim: int) -> opt.OPTConfig:
    """The trained model: the converted OPT's shape and dropout rates (`init.opt`; rates
    `config.model` sets override them) or `config.model`, with the image tokens
    appended (as rows, or through the codebook projection of the tokenizer's
    `code_dim`-wide codebook) and `config.lora`'s adapters."""
    if config.image_embedding not in ("rows", "codebook_projection"):
        raise ValueError(f"image_embedding: expected 'rows' or 'codebook_projection', got {config.image_embedding!r}")
    extra = num_codes + opt.IMAGE_MARKERS
    projected = config.image_embedding == "codebook_projection"
    added = dict(extra_tokens=extra, code_dim=code_dim if projected else 0, lora_rank=config.lora.rank,
                 lora_alpha=config.lora.alpha, lora_targets=config.lora.targets, lora_dropout=config.lora.dropout)
    if config.init.opt:
        base = converted_opt(config)
        expected = 0 if projected else extra
        if base.extra_tokens != expected:
            raise ValueError(f"init.opt: the export has {base.extra_tokens} appended tokens; with image_embedding="
                             f"{config.image_embedding!r} and the tokenizer's {num_codes} codes convert with "
                             f"--image_tokens={0 if projected else num_codes}")
        # The image tokens' ids follow the model's vocabulary: text ids beyond it would be read as them.
        if text_vocab_size > base.vocab_size:
            raise ValueError(f"init.opt: the export's vocabulary ({base.vocab_size}) is smaller than the text "
                             f"tokenizer's ({text_vocab_size}, text_tokenizer {config.text_tokenizer.to_dict()})")
        rates = model_rates(config)
        warn_if_rates_unrecorded(config.init.opt, rates)
        return opt.OPTConfig.from_dict({**base.__dict__, **rates, **added})
    if text_vocab_size > config.model.vocab_size:
        raise ValueError(f"model.vocab_size {config.model.vocab_size} is smaller than the text tokenizer's "
                         f"vocabulary ({text_vocab_size})")
    return opt.OPTConfig.from_dict({**config.model.to_dict(), **added})


def converted_opt(config) -> opt.OPTConfig:
    """The config of the converted OPT export at `init.opt`, else a ValueError naming it."""
    return weights.read_config_named("init.opt", config.init.opt, "opt")[1]


def warn_if_rates_unrecorded(export: str, rates: dict[str, float]) -> None:
    """Logs a warning when the export at `export` predates recorded dropout rates (it
    loads with 0.0) and `rates` does not set them either."""
    missing = [name for name in DROPOUT_RATES if name not in rates and name not in weights.stored_config_fields(export)]
    if missing:
        logging.warning("init.opt: %s records no %s (written before exports recorded dropout): training takes 0.0; "
                        "convert it again to train at the rates of its config.json, or set --config.model.%s",
                        export, " or ".join(missing), missing[0])


def model_builder(model_config: opt.OPTConfig, config) -> Callable[[], opt.OPT]:
    """() -> the trained model, initialised at random (`config`'s dtype, remat and seed);
    `nnx.eval_shape` of it is the model's shapes alone."""
    dtype = layers.compute_dtype(config.dtype)
    return lambda: opt.OPT(model_config, dtype=dtype, remat=config.remat, rngs=nnx.Rngs(config.seed))


def create_model(model_config: opt.OPTConfig, config, mesh, codebook: np.ndarray | None = None) -> opt.OPT:
    """The model initialised into its shardings; base weights from `init.opt` if set;
    with the codebook projection, `codebook` (K,C) scaled to unit RMS as its code vectors
    (and with `init.opt` too, the appended rows in the export's distribution:
    `start_projected_rows_in_distribution`)."""
    create = model_builder(model_config, config)
    graphdef, abstract = nnx.split(nnx.eval_shape(create))
    shardings = parallel.state_shardings(abstract, mesh, config.axis_rules)
    model = nnx.merge(graphdef, jax.jit(lambda: nnx.state(create()), out_shardings=shardings)())
    if config.init.opt:
        appended = ("lora_", "embed_extra", "code_vectors", "code_projection")
        base = [k for k in weights.flat_params(model) if not any(a in k for a in appended)]
        warm_start_lib.load_into(model, config.init.opt, kinds=("opt",), require=tuple(base),
                                 shardings=weights.flat_shardings(shardings))
    if model_config.code_dim:
        if codebook is None or codebook.shape != (model_config.num_projected_codes, model_config.code_dim):
            raise ValueError(f"codebook: expected shape {(model_config.num_projected_codes, model_config.code_dim)} "
                             f"for the codebook projection, got {None if codebook is None else codebook.shape}")
        vectors = codebook / np.sqrt(np.mean(np.square(codebook)))
        model.code_vectors.set_value(jax.device_put(vectors.astype(np.float32),
                                                    model.code_vectors.get_value().sharding))
        if config.init.opt:
            start_projected_rows_in_distribution(model, mesh, config.seed)
    return model


def start_projected_rows_in_distribution(model: opt.OPT, mesh, seed: int) -> None:
    """A converted OPT (--image_tokens=0) with the codebook projection: <img> and </img>
    start as the converter's appended rows do (`opt.rows_in_distribution` of the export's
    token rows), and so do the projected codes: the projection's bias is the rows' mean and
    its kernel maps the unit-RMS code vectors to noise at NEW_ROW_NOISE of their spread."""
    stats = jax.jit(lambda table: (table.mean(0), table.std(0)), out_shardings=parallel.replicated(mesh))
    mean, spread = (np.asarray(x, np.float64) for x in stats(model.embed_tokens[...]))
    rng = np.random.default_rng(seed)
    code_dim = model.config.code_dim
    markers = opt.rows_in_distribution(mean, spread, opt.IMAGE_MARKERS, rng)  # the converter's first rows
    noise = opt.rows_in_distribution(np.zeros_like(mean), spread, code_dim, rng) / code_dim ** 0.5
    values = [(model.embed_extra, markers), (model.code_projection.bias, mean), (model.code_projection.kernel, noise)]
    for param, value in values:
        param.set_value(jax.device_put(value.astype(np.float32), param.get_value().sharding))


def trainable(config):
    """Every parameter but the tokenizer's codebook (a model trained from scratch) or
    SEED-OPT's: adapters, appended rows and the codebook projection."""
    return opt.train_all_filter if config.train_all else opt.trainable_filter


# ---------------------------------------------------------------- evaluation
class Evaluator:
    """Captions and codes generated for held-out code records, scored and sampled."""

    def __init__(self, config, eval_records: list[dict], image_tokens: sequences.ImageTokens,
                 text: opt_text.OPTTextTokenizer, retrieval: CodeRetrieval | None, workdir: str,
                 tokenizer_export: str, decoder_export: str, mesh: jax.sharding.Mesh | None = None):
        """`retrieval`: None reports no t2i/* metrics; `decoder_export`: a diffusion
        export for sample images, "" for none; `mesh`: the one the model is split over,
        over which decoding splits the rows with `eval.rows_apart` (`parallel.rows_apart`)."""
        self.config, self.records, self.image_tokens, self.text = config, eval_records, image_tokens, text
        self.mesh = mesh
        self.retrieval, self.workdir = retrieval, workdir
        self.captions = [r["caption"] for r in eval_records]
        self.images = [records.image_id(r["id"]) for r in eval_records]  # an image's captions are all its own
        self.codes = np.stack([r["codes"] for r in eval_records])
        self.tokenizer_export, self.decoder_export = tokenizer_export, decoder_export
        if len(eval_records) < config.eval.num_samples:
            logging.warning("eval.num_samples %d: the evaluation reads %d held-out records, so samples.json holds "
                            "%d", config.eval.num_samples, len(eval_records), len(eval_records))
        self.true_code_recall = retrieval.recall(self.codes, self.captions, self.images) if retrieval else None
        self._seed_opt = None  # built at the first evaluation, then kept with its programs

    def seed_opt(self, model: opt.OPT) -> api.SeedOPT:
        """`model` behind the API, its programs compiled once across evaluations (the API
        holds the model's variables, so it reads what training writes into them)."""
        if self._seed_opt is None or self._seed_opt.model is not model:
            ids = {"image_start_id": self.image_tokens.start, "image_end_id": self.image_tokens.end,
                   "first_code_id": self.image_tokens.first_code}
            self._seed_opt = api.SeedOPT(model, dtype=self.config.dtype, image_token_ids=ids,
                                         text_tokenizer=self.text,
                                         prompts=sequences.Prompts(**self.config.prompts.to_dict()),
                                         max_text_tokens=self.config.data.max_text_tokens,
                                         codes_per_image=self.codes.shape[1], batch_size=self.config.eval.batch_size,
                                         mesh=self.mesh if self.config.eval.rows_apart else None,
                                         axis_rules=self.config.axis_rules)
        return self._seed_opt

    def __call__(self, model: opt.OPT, step: int, phase: str) -> dict[str, float]:
        e = self.config.eval
        seed_opt = self.seed_opt(model)
        captions = caption_all(seed_opt, self.codes, batch_size=e.batch_size, max_new_tokens=e.max_caption_tokens)
        generated = np.concatenate([seed_opt.image_codes(self.captions[start:start + e.batch_size])
                                    for start in range(0, len(self.captions), e.batch_size)])
        metrics = score_captions(captions, self.captions, self.images)  # by part too on the shapes world
        if self.retrieval:
            recall = self.retrieval.recall(generated, self.captions, self.images)
            metrics.update({"t2i/retrieval_r1": recall["r1"], "t2i/retrieval_r5": recall["r5"],
                            "t2i/true_codes_retrieval_r1": self.true_code_recall["r1"]})
        metrics["num_examples"] = float(len(self.captions))
        logging.info("%s eval at step %d: %s", phase, step, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if jax.process_index() == 0:
            self._save_samples(step, captions, generated)
        return metrics

    def _save_samples(self, step: int, captions: list[str], generated: np.ndarray) -> None:
        k = self.config.eval.num_samples
        samples = [{"id": r["id"], "caption": r["caption"], "generated_caption": c,
                    "codes_generated_from_caption": g.tolist()}
                   for r, c, g in zip(self.records[:k], captions[:k], generated[:k])]
        records.write_json(os.path.join(self.workdir, "samples.json"), {"step": step, "samples": samples})
        if self.decoder_export:  # images from the generated codes, beside the originals' reconstructions
            # Loaded for each evaluation and freed after: held through training, a SEED tokenizer
            # and a Stable Diffusion model would take device memory the training needs.
            tokenizer = api.SeedTokenizer.load(self.tokenizer_export, diffusion=self.decoder_export)
            d = self.config.eval.decode
            options = dict(num_steps=d.num_steps, guidance_scale=d.guidance_scale, sampler=d.sampler)
            rows = [tokenizer.decode(self.codes[:k], **options), tokenizer.decode(generated[:k], **options)]
            Image.fromarray(image_grid(rows, rows[0].shape[1])).save(os.path.join(self.workdir, "samples.png"))


def decoder_export(config) -> str:
    """The diffusion export that paints sample images, or "" for none. A missing
    `decoder_export` is an error, unless `decoder_export_required` is off (the demo
    points at the decoder demo's default workdir, which may not have been trained)."""
    path = config.decoder_export
    if path and not os.path.exists(os.path.join(path, weights.CONFIG_FILE)):
        if config.decoder_export_required:
            raise FileNotFoundError(f"decoder_export: no diffusion export at {path!r}")
        logging.warning("decoder_export %s does not exist: samples get no images (train the decoder demo, "
                        "python -m seed_jax.main --config=configs/decoder.py, for them)", path)
        return ""
    return os.path.abspath(path) if path else ""


def check_decode_options(config, decoder: str) -> None:
    """`eval.decode`'s options, with which the diffusion export `decoder` ("": none, and they
    go unused) paints samples.png, as `SeedTokenizer.decode` checks them, else a ValueError
    naming them. An export of another kind is `paired_decoder`'s to refuse."""
    kind, diffusion, _ = weights.read_config(decoder) if decoder else (None, None, None)
    if kind != "stable_diffusion":
        return
    d = config.eval.decode
    try:
        stable_diffusion.check_sampling(diffusion.schedule, d.num_steps, d.guidance_scale, d.sampler, seed=0)
    except ValueError as error:  # "sampler: ...", "num_steps: ...", "guidance_scale: ..."
        raise ValueError(f"eval.decode.{error}") from None


def paired_decoder(path: str, clip_text, tokenizer_workdir: str, required: bool) -> str:
    """`path`, a diffusion export ("" for none), if its text encoder is `clip_text`: the
    CLIP text encoder of the tokenizer run in `tokenizer_workdir`, whose generation
    embeddings distil into it. A decoder trained for another tokenizer run (another seed
    or CLIP) would paint from embeddings it never saw, images unrelated to the codes: an
    error when `required` (a ConfigError), else a warning and "" (samples without images).
    Every process calls it (the weights are gathered)."""
    if not path:
        return ""
    expected = {f"text_encoder.{k}": v for k, v in weights.gathered(weights.flat_params(clip_text)).items()}
    reason = _unpaired_because(path, expected, tokenizer_workdir)
    if not reason:
        return path
    message = (f"decoder_export {path}: {reason}. Train one for this run in a new workdir (python -m seed_jax.main "
               f"--config=configs/decoder.py --workdir=NEW --config.tokenizer_workdir={tokenizer_workdir}) and pass "
               f"NEW/export as decoder_export")
    if required:
        raise command_line.ConfigError(message)
    logging.warning("%s; samples get no images", message)
    return ""


# One CLIP text encoder drawn again from its seed differs in the last bits where the
# compiler, its flags or the backend do (3e-7 relative, XLA's CPU optimisations on vs
# off); another seed's differs by the weights' own size (0.01-0.1).
_SAME_WEIGHTS_RTOL, _SAME_WEIGHTS_ATOL = 1e-5, 1e-7


def _unpaired_because(path: str, expected: dict[str, np.ndarray], tokenizer_workdir: str) -> str:
    """Why the export at `path` does not hold `expected` (dotted path -> array: the
    tokenizer run's CLIP text encoder under `text_encoder.`), or "" when it does."""
    stored = weights.stored_shapes(path)
    if not any(k.startswith("text_encoder.") for k in stored):
        return (f"it holds no text encoder (a {weights.read_config(path)[0]!r} export), so it cannot be told to be a "
                f"decoder of the tokenizer run in {tokenizer_workdir}")
    same_shapes = all(stored.get(k) == v.shape for k, v in expected.items())
    found = weights.load_params(path, keys=expected) if same_shapes else {}
    differing = [k for k, v in expected.items()
                 if k not in found or not np.allclose(found[k], v, rtol=_SAME_WEIGHTS_RTOL, atol=_SAME_WEIGHTS_ATOL)]
    if not differing:
        return ""
    return (f"its text encoder is not the CLIP text encoder of the tokenizer run in {tokenizer_workdir} (first at "
            f"{differing[0]}): it was trained for another tokenizer run, and would paint images unrelated to the codes")


# ---------------------------------------------------------------- data
def codes_dir_shards(config) -> tuple[list[str], list[str]]:
    """(train, eval) code-record shards in `data.codes_dir`; a split without any is a
    ValueError naming the field."""
    d = config.data
    return (records.shard_paths(d.codes_dir, d.train_prefix, "data.codes_dir"),
            records.shard_paths(d.codes_dir, d.eval_prefix, "data.codes_dir"))


def code_paths(config, workdir: str, tok_dir: str | None, tok_export: str,
               tok_config) -> tuple[list[str], list[str]]:
    """(train, eval) code-record shards: `data.codes_dir` (checked to be written with
    `tok_export` where its summaries say), or the images of the tokenizer run in
    `tok_dir` (trained with `tok_config`: its synthetic shapes or its own shards)
    pre-tokenized into WORKDIR/codes. Shards it cannot read are a ConfigError."""
    d = config.data
    if d.codes_dir:
        with command_line.config_checks():
            pretokenize.check_written_with(d.codes_dir, [d.train_prefix, d.eval_prefix], tok_export)
            return codes_dir_shards(config)
    if tok_dir is None:
        raise command_line.ConfigError("data.codes_dir: required unless the tokenizer is trained here (the demo)")
    directory = os.path.join(workdir, "codes")
    image_train, image_eval = tokenizer_trainer.run_dataset_paths(tok_config, tok_dir)
    splits = {d.train_prefix: image_train, d.eval_prefix: image_eval}
    pretokenize.pretokenize(tok_export, splits, directory, batch_size=256, num_threads=d.num_threads)
    return records.shard_paths(directory, d.train_prefix), records.shard_paths(directory, d.eval_prefix)


def planned_lengths(config, workdir: str) -> tuple[int, int]:
    """(the model's positions, the tokenizer's codes per image) that `train` will build
    with, read before any work: from `init.opt`'s export or `model`, and from
    `tokenizer_export`, the finished tokenizer run it reuses or `tokenizer` (the run it
    trains first)."""
    positions = converted_opt(config).max_positions if config.init.opt else config.model.max_positions
    if config.tokenizer_export:
        tokenizer = read_codes_export("tokenizer_export", config.tokenizer_export)
        return positions, tokenizer.qformer.num_queries
    return positions, planned_tokenizer_run(config, workdir).model.qformer.num_queries


def planned_tokenizer_run(config, workdir: str):
    """The config of the tokenizer run `train` uses without `tokenizer_export`: the finished
    run it reuses, as recorded, or `tokenizer` (the run it trains first)."""
    tok_dir = tokenizer_trainer.run_directory(config, workdir)
    if os.path.exists(os.path.join(tok_dir, "DONE.json")):
        return export_lib.read_workdir_config(tok_dir)
    return config.tokenizer


def check_held_out_count(config, workdir: str) -> None:
    """`eval.num_examples` against the held-out images of the synthetic shapes world of
    the tokenizer run `train` uses (one caption each), before any work; else a ValueError
    naming both. Without `tokenizer_export` and `data.codes_dir` only: other held-out
    records are counted once read."""
    if config.tokenizer_export or config.data.codes_dir:
        return
    data = planned_tokenizer_run(config, workdir).get("data") or {}
    if data.get("source") != "synthetic":
        return
    held_out = data["synthetic"]["num_eval"]
    if config.eval.num_examples > held_out:
        raise ValueError(f"eval.num_examples {config.eval.num_examples}: the tokenizer run's shapes world holds "
                         f"{held_out} held-out images (its data.synthetic.num_eval), each with one caption")


def check_lengths(config, max_positions: int, codes_per_image: int) -> None:
    """Rows the model can read (`data.seq_length` of its `max_positions`) that hold a
    sequence's image (</s> <img> codes </img> and a caption token: `codes_per_image` + 3
    inputs), and phases whose text -> image sequences fit their rows (the codes and
    </img> are targets), else a ValueError naming the field to change."""
    seq_length = config.data.seq_length
    if seq_length > max_positions:
        raise ValueError(f"data.seq_length {seq_length} exceeds the model's {max_positions} positions")
    if seq_length < codes_per_image + 3:
        raise ValueError(f"data.seq_length {seq_length}: no sequence fits in a row; one with an image of the "
                         f"tokenizer's {codes_per_image} codes takes at least {codes_per_image + 3} tokens")
    for _, key in PHASES:
        phase = config[key]
        if phase.text_to_image_fraction > 0 and phase.max_targets_per_row < codes_per_image + 1:
            raise ValueError(f"{key}.max_targets_per_row {phase.max_targets_per_row}: a text -> image sequence has "
                             f"{codes_per_image + 1} targets (its codes and </img>)")


def check_caption_tokens(config, max_positions: int, codes_per_image: int, text: opt_text.OPTTextTokenizer) -> None:
    """`eval.max_caption_tokens` that fit the model's `max_positions` after the caption
    prompt (<s>, an image of `codes_per_image` codes, `prompts.caption` in `text`'s tokens),
    as `api.SeedOPT.caption_codes` fits them, else a ValueError naming it."""
    image = sequences.ImageTokens.after_vocabulary(text.vocab_size, 1)  # the prompt's length alone
    builder = sequences.SequenceBuilder(text, image, sequences.Prompts(**config.prompts.to_dict()),
                                        config.data.max_text_tokens)
    prompt = len(builder.caption_prompt(np.zeros(codes_per_image, np.int32)))
    room = new_token_room(max_positions, prompt)
    if config.eval.max_caption_tokens > room:
        raise ValueError(f"eval.max_caption_tokens {config.eval.max_caption_tokens}: the model's {max_positions} "
                         f"positions leave {room} new tokens after the caption prompt's {prompt} (<s>, an image of "
                         f"{codes_per_image} codes and prompts.caption {config.prompts.caption!r})")


def check_generation_prompts(config, captions: Sequence[str], builder: sequences.SequenceBuilder,
                             max_positions: int, codes_per_image: int) -> None:
    """Held-out `captions` whose text -> image prompts (<s>, `prompts.generate` with the
    caption, at most `data.max_text_tokens` tokens, <img>) leave the model's
    `max_positions` room for an image's codes and </img>, as `api.SeedOPT.image_codes`
    needs them, else a ValueError naming the longest."""
    lengths = [len(builder.generation_prompt(caption)) for caption in captions]
    longest = int(np.argmax(lengths))
    room = new_token_room(max_positions, lengths[longest])
    if room < codes_per_image + 1:
        raise ValueError(f"data.max_text_tokens {config.data.max_text_tokens}: the held-out caption "
                         f"{captions[longest]!r} makes a text -> image prompt of {lengths[longest]} tokens, which "
                         f"leaves {room} of the model's {max_positions} positions for an image's {codes_per_image} "
                         "codes and </img>")


# ---------------------------------------------------------------- driver
def train(config, workdir: str) -> bool:
    """Both phases into `workdir` (resuming), then the merged export. False if preempted."""
    with command_line.config_checks():
        check_config(config)
        run_config.check(workdir, config, RUN_DEFINING, RUN_PATHS)
        checkpointing.check_stage_order(os.path.join(workdir, "checkpoints"),
                                        [(name, key, config[key].num_steps) for name, key in PHASES])
        # checked again with the model and tokenizer built: this reads what they will be
        planned = planned_lengths(config, workdir)
        check_lengths(config, *planned)
        check_held_out_count(config, workdir)
        run_config.write(workdir, config, RUN_DEFINING, RUN_PATHS)
        decoder = decoder_export(config)
        check_decode_options(config, decoder)  # else they failed at the first evaluation, after phase 1 trained
        if config.data.codes_dir:  # its shards, before any tokenizer trains
            codes_dir_shards(config)
    text = text_tokenizer(config, workdir)  # before the tokenizer trains: its refusals come first
    with command_line.config_checks():  # else it failed at the first evaluation, after phase 1 trained
        check_caption_tokens(config, *planned, text)
    if config.tokenizer_export:
        tok_dir, tok_export, tok_config = None, config.tokenizer_export, None
    else:
        trained = tokenizer_trainer.ensure_trained(config, workdir)
        if trained is None:  # the tokenizer's training was preempted
            return False
        tok_dir, tok_export, tok_config = trained
    tokenizer_model, _, _ = weights.load_model(tok_export, kind="seed_tokenizer")
    num_codes = tokenizer_model.config.num_codes
    codebook = np.asarray(tokenizer_model.quantize.codebook[...])
    mesh = parallel.make_mesh(config.mesh.to_dict())
    if decoder and tok_dir:  # a tokenizer run: the decoder must have been trained in its CLIP text encoder's space
        # (checked before pre-tokenizing, which may take hours)
        decoder = paired_decoder(decoder, tokenizer_trainer.create_clip_text(tok_config, mesh), tok_dir,
                                 config.decoder_export_required)
    train_paths, eval_paths = code_paths(config, workdir, tok_dir, tok_export, tok_config)
    codes_per_image = tokenizer_model.config.qformer.num_queries
    skipped = pipeline.SkipCounter()
    with command_line.config_checks():  # before the model is built (a converted OPT loads for minutes)
        eval_records = sequences.read_code_records(eval_paths, config.eval.num_examples,
                                                   pipeline.counted_once(skipped), codes_per_image, num_codes,
                                                   name="eval.num_examples")
    m_config = model_config(config, text.vocab_size, num_codes, codebook.shape[1])
    model = create_model(m_config, config, mesh, codebook)
    logging.info("SEED-OPT: %s", m_config)
    check_lengths(config, m_config.max_positions, codes_per_image)
    check_caption_tokens(config, m_config.max_positions, codes_per_image, text)
    image_tokens = sequences.ImageTokens.after_vocabulary(m_config.vocab_size, num_codes)
    builder = sequences.SequenceBuilder(text, image_tokens, sequences.Prompts(**config.prompts.to_dict()),
                                        config.data.max_text_tokens)

    with command_line.config_checks():  # else refused at the first evaluation, after phase 1 trained
        check_generation_prompts(config, [r["caption"] for r in eval_records], builder, m_config.max_positions,
                                 codes_per_image)
    retrieval = code_retrieval(config, tokenizer_model, tok_export, tok_dir, tok_config)
    writer = reporting.MetricsWriter(workdir)
    evaluator = Evaluator(config, eval_records, image_tokens, text, retrieval, workdir, tok_export, decoder, mesh)
    preemption = coordination.Preemption()
    try:
        for index, (name, key) in enumerate(PHASES):
            phase = config[key]
            example = sequences.CodeExample(builder, phase.text_to_image_fraction, config.data.seq_length,
                                            phase.max_targets_per_row, skipped, codes_per_image)
            train_iter = sequences.packed_train_iterator(
                train_paths, example, global_batch_size=phase.batch_size, seed=config.seed + index,
                num_packing_bins=config.data.num_packing_bins, num_threads=config.data.num_threads)
            done = loop.run_stage(
                name=name, model=model, trainable=trainable(config), loss_fn=lm_loss, stage=phase, config=config,
                mesh=mesh, train_iter=train_iter, evaluate=lambda m, step, name=name: evaluator(m, step, name),
                writer=writer, preemption=preemption, checkpoint_dir=os.path.join(workdir, "checkpoints", name),
                counters={"data/skipped_records": skipped}, stage_index=index)
            if not done:
                return False
    finally:
        preemption.close()
        writer.close()
    out = os.path.join(workdir, "export")
    params = weights.gathered(weights.flat_params(model))  # on every process; then process 0 writes
    steps = checkpointing.trained_steps(os.path.join(workdir, "checkpoints"), list(PHASES))

    coordination.export_and_mark_done(
        workdir, out, steps, lambda: export(
            model.config, params, image_tokens, text, out,
            info={"workdir": workdir, "tokenizer_export": tok_export, "steps": steps,
                  "prompts": config.prompts.to_dict(), "max_text_tokens": config.data.max_text_tokens,
                  "codes_per_image": codes_per_image, "tokenizer_codebook": codebook_digest(codebook)}),
        done={"export": out, "tokenizer_export": tok_export})
    return True


def export(config: opt.OPTConfig, params: dict, image_tokens: sequences.ImageTokens,
           text: opt_text.OPTTextTokenizer, out: str, info: dict) -> None:
    """The model (`config`, this process's whole dotted-path `params`) with LoRA merged
    into its base weights, as an `opt` export with the image token ids and the text
    tokenizer (`api.SeedOPT.load(out)`)."""
    merged_config, params = opt.merge_lora(config, params)
    weights.check_free(out)
    os.makedirs(out, exist_ok=True)
    text.save(os.path.join(out, opt_text.FILE_NAME))  # before model.json, which marks a whole export
    weights.save(out, "opt", merged_config, params,
                 info={**info, "image_start_id": image_tokens.start, "image_end_id": image_tokens.end,
                       "first_code_id": image_tokens.first_code})


def code_retrieval(config, tokenizer_model, tok_export: str, tok_dir: str | None, tok_config) -> CodeRetrieval | None:
    """The t2i evaluation's caption retrieval through the tokenizer's stage-I heads; None,
    with a warning, for a tokenizer without them (SEED v1 converted without --qformer)."""
    if not (tokenizer_model.config.with_itc_heads and tokenizer_model.config.qformer.with_text):
        logging.warning("%s: the tokenizer %s has no Q-Former text branch and contrastive heads (vision_proj, "
                        "text_proj), which t2i retrieval scores codes with: the evaluation reports no t2i/* metrics "
                        "(convert SEED v1 with --qformer for them)",
                        "tokenizer_export" if config.tokenizer_export else "tokenizer_workdir", tok_export)
        return None
    if tok_dir:
        caption_tokenizer = tokenizer_trainer.text_tokenizers(tok_config, tok_dir)[0]
    else:
        with command_line.config_checks():  # a missing vocab.txt: the message alone, before training
            caption_tokenizer = _caption_tokenizer(config)
    return CodeRetrieval(tokenizer_model, caption_tokenizer, process_caption=caption_processor(config, tok_config))


def caption_processor(config, tok_config) -> Callable[[str], str]:
    """What the tokenizer's training did to captions before its Q-Former text tokenizer
    (`data.text.caption_processor`): its run's `data.caption_processor` (`tok_config`), or
    for a `tokenizer_export` (`tok_config` None) `caption_tokenizer.caption_processor`."""
    from seed_jax.data import text as caption_text

    if tok_config is not None:
        return caption_text.caption_processor(tok_config.data.caption_processor)
    return caption_text.caption_processor(config.caption_tokenizer.caption_processor,
                                          "caption_tokenizer.caption_processor")


def _caption_tokenizer(config):
    """The Q-Former caption tokenizer of a tokenizer trained elsewhere (BERT WordPiece)."""
    from seed_jax.data import text as caption_text

    vocab = config.caption_tokenizer.vocab_file
    bert = caption_text.bert_wordpiece(vocab, "caption_tokenizer.vocab_file")
    return caption_text.TextTokenizer(bert, config.caption_tokenizer.max_length, bert.token_to_id("[PAD]"))

"""SEED-OPT: OPT learns to caption images from SEED codes and to write codes from captions.

Run (the default preset is `demo`):

  python -m seed_jax.main --config=configs/seed_opt.py [--workdir=workdirs/seed_opt_demo]
  python -m seed_jax.main --config=configs/seed_opt.py:seed_opt_2.7b,gpu8 --workdir=/ckpt/seed_opt

`demo` reuses the tokenizer demo's run (`--config.tokenizer_workdir`, default
workdirs/tokenizer_demo, where `python -m seed_jax.main --config=configs/tokenizer.py`
writes it; trained there first when it holds no finished run), pre-tokenizes that
run's synthetic shapes into code records, and trains a small OPT from scratch:
phase 1 image -> text, phase 2 both directions. WORKDIR/metrics.jsonl gets
caption/exact_match and t2i/retrieval_r1 on held-out images, WORKDIR/samples.json
captions and generated codes, and samples.png images painted from the codes when the
decoder demo has run (`--config.decoder_export`, default workdirs/decoder_demo/export,
where `python -m seed_jax.main --config=configs/decoder.py` exports it). `seed_opt_2.7b` trains LoRA adapters and
the 8194 appended token rows of OPT-2.7B converted with
`python -m seed_jax.convert hf_opt --checkpoint=OPT_FOLDER --out=/ckpt/opt_2.7b_seed`,
on a corpus pre-tokenized with configs/pretokenize.py. Training drops as transformers'
OPT does in train mode: `model.dropout` on the attention block's and fc2's outputs,
`model.attention_dropout` on the attention probabilities, `lora.dropout` on the
adapters' inputs (peft's lora_dropout); evaluation never drops. `demo` and `tiny`
train without dropout (0.0 each); `seed_opt_2.7b` leaves the model's rates None, which
takes the converted OPT's (its config.json's: 0.1 and 0.0 in the released ones), and
`lora.dropout` 0.0 (SEED-OPT's LoRA settings were not published). Layout presets (`cpu`,
`gpu8`, `gpu8x8`, `tpu_v4_32`) combine FSDP with tensor parallelism over heads and
MLP width.

Measured (2-core CPU, 16m40s-18m22s from a clean clone, the tokenizer demo's included): on
256 held-out images t2i/retrieval_r1 0.58 and caption/exact_match 0.21, held back by the
demo tokenizer's codes, which carry shape weakly (`seed_jax/evaluators/feature_probe.py`)
and repeat one another: each causal query's output is a linear function of the last's
with R^2 0.94-0.97 (`seed_jax/evaluators/query_redundancy.py`). Four times the phase-1
steps plateau at exact match 0.24 (docs/seed_opt_demo.md).
"""

import os

import ml_collections
from ml_collections.config_dict import placeholder

from seed_jax import config_files
from seed_jax.parallel import DEFAULT_RULES
from seed_jax.trainers.loop import AT_STAGE_END

MODEL_PRESETS = ("demo", "seed_opt_2.7b", "tiny")
LAYOUT_PRESETS = {
    "cpu": dict(data=-1, fsdp=1, tensor=1),
    "gpu8": dict(data=1, fsdp=4, tensor=2),  # one 8-GPU host
    "gpu8x8": dict(data=8, fsdp=4, tensor=2),  # 8 hosts: data-parallel across hosts
    "tpu_v4_32": dict(data=2, fsdp=4, tensor=2),
}


def _phase(num_steps, batch_size, lr, text_to_image_fraction, warmup_steps, max_targets_per_row,
           weight_decay=0.0):
    """One phase: `batch_size` packed rows; `text_to_image_fraction` of sequences are
    text -> image (0 in phase 1). A row holds `data.seq_length` tokens of which at most
    `max_targets_per_row` take loss; logits are computed for those only, so a bound that
    fits the phase's rows and no more saves output-layer work."""
    return ml_collections.ConfigDict(dict(num_steps=num_steps, batch_size=batch_size, lr=lr, init_lr=lr / 100,
                                          end_lr=lr / 10, warmup_steps=warmup_steps, weight_decay=weight_decay,
                                          b1=0.9, b2=0.98, text_to_image_fraction=text_to_image_fraction,
                                          max_targets_per_row=max_targets_per_row))


def _opt(vocab_size, width, depth, num_heads, mlp_dim, max_positions, dropout=0.0, attention_dropout=0.0):
    """An OPT trained from scratch (`OPTConfig`'s fields); with `init.opt` only the
    dropout rates count, None taking the converted OPT's."""
    return ml_collections.ConfigDict(dict(vocab_size=vocab_size, width=width, depth=depth, num_heads=num_heads,
                                          mlp_dim=mlp_dim, max_positions=max_positions, pre_layer_norm=True,
                                          dropout=dropout, attention_dropout=attention_dropout))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    names = [a for a in (arg or "demo").split(",") if a]
    presets = [n for n in names if n in MODEL_PRESETS]
    layouts = [n for n in names if n in LAYOUT_PRESETS]
    if len(presets) + len(layouts) != len(names) or len(presets) > 1 or len(layouts) > 1:
        raise ValueError(f"config arg {arg!r}: expected one of {MODEL_PRESETS} optionally with one layout "
                         f"from {sorted(LAYOUT_PRESETS)}, comma-separated")
    preset = presets[0] if presets else "demo"
    c = ml_collections.ConfigDict()
    c.trainer = "seed_opt"
    c.preset = preset
    c.seed = 0
    c.dtype = "float32"
    c.remat = False
    c.mesh = ml_collections.ConfigDict(LAYOUT_PRESETS["cpu"])
    c.axis_rules = DEFAULT_RULES
    c.tokenizer = config_files.sibling(__file__, "tokenizer.py").get_config("tiny" if preset == "tiny" else "demo")
    c.tokenizer_workdir = ""  # "" = WORKDIR/tokenizer; trained there first when it holds no finished run
    c.tokenizer_export = ""  # a SEED tokenizer export instead (real runs); then data.codes_dir is required
    # With tokenizer_export: its Q-Former's BERT vocabulary, and the processor its training cleaned
    # captions with (t2i retrieval embeds them so; SEED's: LAVIS's blip_caption, `data.text`).
    c.caption_tokenizer = ml_collections.ConfigDict(dict(vocab_file="", max_length=32,
                                                         caption_processor="blip_caption"))
    c.decoder_export = ""  # optional: a diffusion export for images in samples.png
    c.decoder_export_required = True  # False: a missing decoder_export only means no images
    c.data = ml_collections.ConfigDict(dict(codes_dir="", train_prefix="train", eval_prefix="eval", seq_length=128,
                                            num_packing_bins=64, max_text_tokens=64, num_threads=2))
    c.text_tokenizer = ml_collections.ConfigDict(dict(kind="word_bpe", folder=""))
    c.prompts = ml_collections.ConfigDict(dict(caption="A photo of", generate="Generate an image: {caption}",
                                               question="Question: {question} Short answer."))
    c.init = ml_collections.ConfigDict(dict(opt=""))  # a converted OPT export (`convert hf_opt`)
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=32.0, targets=("query", "key", "value", "out", "fc1",
                                                                          "fc2"), dropout=0.0))
    c.train_all = True  # False: only the adapters and appended token rows train
    # How code tokens enter OPT: "rows" (one trainable row per code) or "codebook_projection"
    # (a trainable linear map of the tokenizer's frozen 32-d codebook vectors, as in the
    # paper; with init.opt, convert with --image_tokens=0). On the demo, rows read the codes
    # far better (phase-1 caption exact match 0.20 against 0.04-0.07).
    c.image_embedding = "rows"
    c.log_every_steps = 50
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 2
    # rows_apart: decoding splits the held-out rows over the mesh's batch axes, each device decoding
    # its own with the weights gathered over fsdp once per call, instead of leaving the weights split
    # as training does (benchmarks/sharded_decoding.py times the two on your devices)
    c.eval = ml_collections.ConfigDict(dict(num_examples=256, batch_size=128, max_caption_tokens=24,
                                            num_samples=16, rows_apart=False, decode=ml_collections.ConfigDict(
                                                dict(num_steps=25, guidance_scale=3.0, sampler="ddim"))))
    {"demo": _demo, "seed_opt_2.7b": _seed_opt_2_7b, "tiny": _tiny}[preset](c)
    c.eval_every_steps = AT_STAGE_END  # evaluations at the end of each phase (of any length)
    if layouts:
        c.mesh = ml_collections.ConfigDict(LAYOUT_PRESETS[layouts[0]])
    return c


def _demo(c):
    """A small OPT from scratch on the demo tokenizer's codes and the shapes captions;
    the tokenizer and decoder demos' runs are used where their commands write them."""
    c.tokenizer_workdir = config_files.default_workdir("tokenizer", "demo")
    c.decoder_export = os.path.join(config_files.default_workdir("decoder", "demo"), "export")
    c.decoder_export_required = False
    c.model = _opt(vocab_size=640, width=128, depth=4, num_heads=4, mlp_dim=512, max_positions=128)
    # A row holds at most two sequences (45-55 tokens each): two captions take at most 36
    # targets, two sets of codes 66.
    c.phase1 = _phase(num_steps=500, batch_size=32, lr=2e-3, text_to_image_fraction=0.0, warmup_steps=50,
                      max_targets_per_row=40)
    c.phase2 = _phase(num_steps=500, batch_size=32, lr=2e-3, text_to_image_fraction=0.5, warmup_steps=50,
                      max_targets_per_row=72)


def _seed_opt_2_7b(c):
    """LoRA on converted OPT-2.7B in bfloat16. SEED-OPT's own hyperparameters were
    not published; these follow its recipe's shape (5M pairs, image -> text first)."""
    c.tokenizer_export = "/ckpt/seed_v1_converted"
    c.caption_tokenizer.vocab_file = "/data/tokenizers/bert-base-uncased/vocab.txt"
    c.decoder_export = ""
    c.data.codes_dir = "/data/seed_codes"
    c.data.seq_length = 256
    c.data.num_threads = 8
    c.text_tokenizer = ml_collections.ConfigDict(dict(kind="gpt2_bpe", folder="/ckpt/opt-2.7b"))
    c.init.opt = "/ckpt/opt_2.7b_seed"
    # The converted checkpoint's dropout rates (None): 0.1 on the residual branches, as transformers trains OPT
    c.model = _opt(vocab_size=50272, width=2560, depth=32, num_heads=32, mlp_dim=10240, max_positions=2048,
                   dropout=placeholder(float), attention_dropout=placeholder(float))
    c.lora.rank = 16
    c.train_all = False
    c.dtype = "bfloat16"
    c.remat = True
    c.mesh = ml_collections.ConfigDict(LAYOUT_PRESETS["gpu8"])
    c.phase1 = _phase(num_steps=10_000, batch_size=256, lr=2e-4, text_to_image_fraction=0.0, warmup_steps=500,
                      max_targets_per_row=160)
    c.phase2 = _phase(num_steps=20_000, batch_size=256, lr=2e-4, text_to_image_fraction=0.5, warmup_steps=500,
                      max_targets_per_row=160)
    c.log_every_steps = 100
    c.checkpoint_every_steps = 1000
    c.eval.update(num_examples=5000, batch_size=64, max_caption_tokens=30)


def _tiny(c):
    """Test size: the tiny tokenizer, a tiny OPT, a few steps."""
    c.model = _opt(vocab_size=640, width=32, depth=2, num_heads=2, mlp_dim=64, max_positions=128)
    c.phase1 = _phase(num_steps=3, batch_size=8, lr=1e-3, text_to_image_fraction=0.0, warmup_steps=1,
                      max_targets_per_row=40)
    c.phase2 = _phase(num_steps=3, batch_size=8, lr=1e-3, text_to_image_fraction=0.5, warmup_steps=1,
                      max_targets_per_row=72)
    c.data.num_packing_bins = 8
    c.log_every_steps = 1
    c.checkpoint_every_steps = 2
    c.eval.update(num_examples=16, batch_size=8, num_samples=4)

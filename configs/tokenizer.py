"""SEED tokenizer training: stage I (causal Q-Former) then stage II (VQ + decoders).

Run (the default preset is `demo`):

  python -m seed_jax.main --config=configs/tokenizer.py
  python -m seed_jax.main --config=configs/tokenizer.py:seed1,gpu8 --workdir=/ckpt/seed1

`demo` trains a small model on the embedded synthetic shapes world on CPU (10
minutes on 2 cores); on 1024 held-out pairs its final stage-1 eval reached
retrieval/i2t_r1 0.78 and its final stage-2 eval retrieval_codes/i2t_r1 0.48 with
957 of 1024 codes in use. `seed1` is the paper's recipe (ViT-g, BERT-base Q-Former, 224 px);
`tiny` is for tests. Layout presets (`cpu`, `gpu8`, `gpu8x8`, `tpu_v4_32`) set the
mesh and combine with a model preset after a comma. Every field can be overridden,
e.g. `--config.stage1.num_steps=100 --config.mesh.data=2 --config.mesh.fsdp=4`.
"""

import ml_collections

from seed_jax.data.pipeline import ALL_RECORDS
from seed_jax.parallel import DEFAULT_RULES
from seed_jax.trainers.loop import AT_STAGE_END

MODEL_PRESETS = ("demo", "seed1", "tiny")
LAVIS_STEPS_PER_EPOCH = 5000  # SEED's BaseTask.train_epoch: iters_per_epoch=5000, whatever the data size
LAYOUT_PRESETS = {
    "cpu": dict(data=-1, fsdp=1, tensor=1),
    "gpu8": dict(data=1, fsdp=-1, tensor=1),  # one 8-GPU host, FSDP across it
    "gpu8x8": dict(data=8, fsdp=8, tensor=1),  # 8 hosts: data-parallel across hosts, FSDP within
    "tpu_v4_32": dict(data=4, fsdp=4, tensor=1),
}


def _vit(image_size, patch_size, width, depth, num_heads, mlp_dim):
    return ml_collections.ConfigDict(dict(image_size=image_size, patch_size=patch_size, width=width,
                                          depth=depth, num_heads=num_heads, mlp_dim=mlp_dim, eps=1e-6))


def _qformer(width, num_layers, num_heads, mlp_dim, encoder_width, num_queries, causal, with_text,
             vocab_size=30523, max_positions=512, dropout=0.1, cross_attention_freq=2):
    return ml_collections.ConfigDict(dict(
        width=width, num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim,
        cross_attention_freq=cross_attention_freq,
        encoder_width=encoder_width, num_queries=num_queries, causal_queries=causal, with_text=with_text,
        vocab_size=vocab_size, max_positions=max_positions, eps=1e-12, dropout=dropout))


def _clip_text(vocab_size, width, depth, num_heads, mlp_dim):
    return ml_collections.ConfigDict(dict(vocab_size=vocab_size, max_length=77, width=width, depth=depth,
                                          num_heads=num_heads, mlp_dim=mlp_dim, eps=1e-5))


def _model(vit, qformer, reverse_qformer, num_codes, decoder_depth, decoder_heads, decoder_mlp_dim,
           generation_width, proj_dim=256, recon_head=True):
    return ml_collections.ConfigDict(dict(
        vit=vit, qformer=qformer, reverse_qformer=reverse_qformer, num_codes=num_codes, code_dim=32,
        decoder_depth=decoder_depth, decoder_heads=decoder_heads, decoder_mlp_dim=decoder_mlp_dim,
        generation_width=generation_width, proj_dim=proj_dim, with_itc_heads=True, init_temperature=0.07,
        vq_beta=0.25, ln_vision_eps=1e-5, recon_head=recon_head))


def _stage(num_steps, lr, init_lr, end_lr, warmup_steps, trainable, weight_decay=0.05, restart_every=0,
           restart_until=0.0, batch_size=0, steps_per_epoch=0, num_epochs=0):
    """One training stage. `batch_size` 0 takes the global `config.batch_size`.
    `restart_unused_codes_every` > 0 (stage II only) restarts codes a batch left
    unused at random encoder outputs, every that many steps until the
    `restart_until` fraction of the stage; the paper's recipe has none.
    `steps_per_epoch` 0 decays the learning rate on a smooth cosine; > 0 as LAVIS's
    `linear_warmup_cosine_lr` does, epoch by epoch, over `num_epochs` (LAVIS's max_epoch;
    0 = as many as `num_steps` spans; `num_steps` may not run past them)
    (`seed_jax/trainers/optim.py`)."""
    return ml_collections.ConfigDict(dict(num_steps=num_steps, batch_size=batch_size, lr=lr, init_lr=init_lr,
                                          end_lr=end_lr, steps_per_epoch=steps_per_epoch, num_epochs=num_epochs,
                                          warmup_steps=warmup_steps, weight_decay=weight_decay,
                                          b1=0.9, b2=0.999, trainable=trainable,
                                          restart_unused_codes_every=restart_every, restart_until=restart_until))


# LAVIS's BLIP-2 stage 1 freezes the ViT alone: ln_vision trains with the Q-Former
# (stage II freezes it, DESIGN §Training).
STAGE1_TRAINABLE = ("ln_vision", "qformer", "vision_proj", "text_proj", "temp")
# Stage II trains everything after the Q-Former. SEED's training code rebuilds the causal
# embeddings for L_recon through a head of its own (`model.recon_head`: pos_embed + blocks)
# beside the generation path (pos_embed_text + blocks_text); without that head (the demo)
# L_recon reads the generation path's blocks.
STAGE2_TRAINABLE_SHARED_HEAD = ("encode_task_layer", "quantize", "decode_task_layer", "pos_embed_text",
                                "blocks_text", "reverse_qformer", "distill_text_proj")
STAGE2_TRAINABLE = STAGE2_TRAINABLE_SHARED_HEAD + ("pos_embed", "blocks")


def _base():
    c = ml_collections.ConfigDict()
    c.trainer = "tokenizer"
    c.seed = 0
    c.batch_size = 1024  # global
    c.dtype = "float32"  # compute dtype; parameters stay float32
    c.remat = False
    c.mesh = ml_collections.ConfigDict(LAYOUT_PRESETS["cpu"])
    c.axis_rules = DEFAULT_RULES
    c.log_every_steps = 50
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 2
    c.label_smoothing = 0.1
    # Stage I's contrastive gradient: "global" (of the global batch's loss) or "lavis" (the
    # gathered features detached, as SEED's distributed training; see contrastive_loss).
    c.itc_gradient = "global"
    c.loss_weights = ml_collections.ConfigDict(dict(vq=5.0, recon=2.0, distill=0.5))
    c.eval = ml_collections.ConfigDict(dict(num_examples=5000, batch_size=256))
    c.init = ml_collections.ConfigDict(dict(qformer="", clip_text="", stage1=""))
    c.data = ml_collections.ConfigDict(dict(
        source="array_record",  # or "synthetic"
        train_dir="", train_prefix="train", eval_dir="", eval_prefix="eval",
        synthetic=ml_collections.ConfigDict(dict(num_train=0, num_eval=0, image_size=64, seed=0, num_shards=4)),
        crop_scale=(0.5, 1.0), flip=True, max_text_length=32,
        # "blip_caption": captions cleaned as SEED's LAVIS training cleans them (lower case,
        # .!"()*#:;~ dropped, 50 words; `text.blip_caption`) before both tokenizers; "none": as written
        caption_processor="none",
        tokenizer=ml_collections.ConfigDict(dict(kind="bert_vocab", vocab_file="", clip_vocab_file="",
                                                 clip_merges_file="")),
        num_threads=8, prefetch=4))
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    names = [a for a in (arg or "demo").split(",") if a]
    model_presets = [n for n in names if n in MODEL_PRESETS]
    layouts = [n for n in names if n in LAYOUT_PRESETS]
    unknown = [n for n in names if n not in MODEL_PRESETS and n not in LAYOUT_PRESETS]
    if unknown or len(model_presets) > 1 or len(layouts) > 1:
        raise ValueError(f"config arg {arg!r}: expected one of {MODEL_PRESETS} optionally with one layout "
                         f"from {sorted(LAYOUT_PRESETS)}, comma-separated")
    preset = model_presets[0] if model_presets else "demo"
    c = _base()
    c.preset = preset
    {"demo": _demo, "seed1": _seed1, "tiny": _tiny}[preset](c)
    if layouts:
        c.mesh = ml_collections.ConfigDict(LAYOUT_PRESETS[layouts[0]])
    return c


def _seed1(c):
    """The SEED v1 recipe: frozen EVA ViT-g and BLIP-2 init, 224 px, BERT / CLIP tokenizers.

    It starts from converted released weights:
      python -m seed_jax.convert lavis_blip2 --checkpoint=blip2_pretrained.pth --vit=eva_vit_g.pth \\
          --out=/ckpt/blip2_stage1_converted
      python -m seed_jax.convert hf_clip_text --checkpoint=SD15/text_encoder --out=/ckpt/sd15_clip_text_converted
    and reads image-caption shards written by `python -m seed_jax.data.make_records`:
      python -m seed_jax.data.make_records --source=folder --input=/data/cc3m/images --resize=256 \\
          --num_shards=64 --out=/data/cc3m/array_record --prefix=train
      python -m seed_jax.data.make_records --source=folder --input=/data/coco \\
          --captions=coco_karpathy_test.json --out=/data/coco_karpathy_test/array_record --prefix=eval
    Stage II alone from a stage-I export: --config.init.qformer= --config.init.stage1=EXPORT
    (`python -m seed_jax.export --workdir=W --stage=stage1 --out=EXPORT`)."""
    c.model = _model(
        _vit(224, 14, 1408, 39, 16, 6144),
        _qformer(768, 12, 12, 3072, 1408, 32, causal=True, with_text=True),
        _qformer(768, 4, 12, 3072, 768, 77, causal=False, with_text=False),
        num_codes=8192, decoder_depth=4, decoder_heads=12, decoder_mlp_dim=3072, generation_width=768)
    c.clip_text = _clip_text(49408, 768, 12, 12, 3072)
    c.dtype = "bfloat16"
    c.remat = True
    # SEED's training (AILab-CVC/SEED, SEED_Tokenizer/train_scripts/*.sh: 8 nodes x 8 GPUs;
    # lavis/projects/blip2/train/pretrain_{qformer,codebook}.yaml: batch_size_train per GPU,
    # max_epoch; lavis/tasks/base_task.py: 5000 iterations an epoch) ran stage I at a global
    # batch of 64 x 64 for 10 epochs and set stage II to 64 x 256 for 500 epochs, the
    # learning rate on LAVIS's epoch-wise cosine (`steps_per_epoch`). How long stage II
    # actually ran is not published: our 50k steps (10 epochs) keep its 500-epoch schedule,
    # which over them stays within 0.1% of lr. Its yaml starts stage II from stage I's
    # epoch-0 checkpoint (checkpoint_0.pth): --config.stage1.num_steps=5000 does so here.
    # Without gradient accumulation, fewer than 64 devices hold more rows each.
    c.batch_size = 64 * 64
    c.stage1 = _stage(num_steps=50_000, lr=3e-5, init_lr=3e-7, end_lr=3e-6, warmup_steps=2000,
                      trainable=STAGE1_TRAINABLE, steps_per_epoch=LAVIS_STEPS_PER_EPOCH, num_epochs=10)
    c.stage2 = _stage(num_steps=50_000, lr=1e-4, init_lr=1e-6, end_lr=1e-5, warmup_steps=2000,
                      trainable=STAGE2_TRAINABLE, batch_size=64 * 256, steps_per_epoch=LAVIS_STEPS_PER_EPOCH,
                      num_epochs=500)
    c.data.caption_processor = "blip_caption"
    c.data.train_dir = "/data/cc3m/array_record"
    c.data.eval_dir = "/data/coco_karpathy_test/array_record"
    # all of Karpathy's test split (5000 images, a record per caption), as BLIP-2 and SEED report retrieval
    c.eval.num_examples = ALL_RECORDS
    c.data.tokenizer.vocab_file = "/data/tokenizers/bert-base-uncased/vocab.txt"
    c.data.tokenizer.clip_vocab_file = "/data/tokenizers/clip-vit-large-patch14/vocab.json"
    c.data.tokenizer.clip_merges_file = "/data/tokenizers/clip-vit-large-patch14/merges.txt"
    c.init.qformer = "/ckpt/blip2_stage1_converted"
    c.init.clip_text = "/ckpt/sd15_clip_text_converted"


def _demo_data(c, num_train, num_eval, image_size):
    c.data.source = "synthetic"
    c.data.synthetic.num_train = num_train
    c.data.synthetic.num_eval = num_eval
    c.data.synthetic.image_size = image_size
    c.data.tokenizer.kind = "wordpiece_grammar"
    # Captions name positions ("at the top left"): a flip or a deep crop would
    # contradict them, so the shapes world trains with mild crops and no flips.
    c.data.crop_scale = (0.8, 1.0)
    c.data.flip = False
    c.data.max_text_length = 20  # the longest shapes caption is 17 words
    c.data.num_threads = 2


def _demo(c):
    """Small model, same code path, embedded synthetic data, CPU in ~10 minutes.

    No BLIP-2 weights exist here, so stage I also trains the ViT (standing in for
    BLIP-2's pre-training); the demo CLIP text encoder has seeded frozen weights and
    defines the space stage II distils into. Stage II runs many small batches: the
    reconstruction it learns is a regression that gains from updates more than from
    batch size, unlike stage I's contrastive loss. The codebook has 1024 codes, not
    SEED's 8192: the demo OPT learns to write 1024 codes from 20k images far better
    (docs/seed_opt_demo.md). L_recon reads the generation path's blocks (no `recon_head`):
    SEED's separate reconstruction head made this demo 12m10s instead of 10m28s for
    retrieval_codes/i2t_r1 0.41 against 0.40 (both from zero position embeddings).
    """
    _demo_data(c, num_train=20_000, num_eval=1024, image_size=64)
    c.model = _model(
        _vit(64, 16, 128, 4, 4, 512),
        _qformer(128, 4, 4, 256, 128, 32, causal=True, with_text=True, vocab_size=128, max_positions=64,
                 dropout=0.0),
        _qformer(128, 1, 4, 256, 128, 77, causal=False, with_text=False, dropout=0.0, cross_attention_freq=1),
        num_codes=1024, decoder_depth=4, decoder_heads=4, decoder_mlp_dim=512, generation_width=128,
        proj_dim=128, recon_head=False)
    c.clip_text = _clip_text(128, 128, 1, 4, 512)
    c.batch_size = 128
    c.stage1 = _stage(num_steps=400, lr=5e-4, init_lr=1e-5, end_lr=1e-4, warmup_steps=50,
                      trainable=("visual_encoder",) + STAGE1_TRAINABLE)
    # A codebook trained from scratch in a few hundred steps collapses onto a few
    # dozen codes; restarting unused ones early on keeps it spread over the data.
    c.stage2 = _stage(num_steps=1200, lr=2e-3, init_lr=1e-5, end_lr=1e-4, warmup_steps=50, batch_size=32,
                      trainable=STAGE2_TRAINABLE_SHARED_HEAD, restart_every=10, restart_until=0.3)
    c.log_every_steps = 50
    c.eval_every_steps = AT_STAGE_END  # evaluations at the end of each stage (of any length)
    c.checkpoint_every_steps = 200
    c.eval.num_examples = 1024
    c.eval.batch_size = 256


def _tiny(c):
    """Test size: everything runs in seconds."""
    _demo_data(c, num_train=256, num_eval=64, image_size=32)
    c.data.synthetic.num_shards = 2
    c.model = _model(
        _vit(32, 8, 32, 2, 2, 64),
        _qformer(32, 2, 2, 64, 32, 32, causal=True, with_text=True, vocab_size=128, max_positions=64,
                 dropout=0.0),
        _qformer(32, 2, 2, 64, 32, 77, causal=False, with_text=False, dropout=0.0),
        num_codes=64, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64, generation_width=16, proj_dim=16)
    c.clip_text = _clip_text(128, 16, 1, 2, 32)
    c.batch_size = 16
    c.stage1 = _stage(num_steps=4, lr=1e-3, init_lr=1e-5, end_lr=1e-4, warmup_steps=2,
                      trainable=("visual_encoder",) + STAGE1_TRAINABLE)
    c.stage2 = _stage(num_steps=4, lr=1e-3, init_lr=1e-5, end_lr=1e-4, warmup_steps=2,
                      trainable=STAGE2_TRAINABLE, restart_every=2, restart_until=0.5)
    c.log_every_steps = 2
    c.eval_every_steps = 4
    c.checkpoint_every_steps = 2
    c.eval.num_examples = 64
    c.eval.batch_size = 32

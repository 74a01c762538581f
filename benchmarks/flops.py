"""Model FLOPs behind the benchmarks' MFU figures: 2 per multiply-add of every matmul
the computation needs, counted from the model config (XLA's cost analysis counts a
scanned layer once, so it cannot be used for scanned stacks)."""

from __future__ import annotations

from seed_jax.models.opt import OPTConfig

ATTENTION_PROJECTIONS = ("query", "key", "value", "out")
# Dense bf16 peaks (datasheets), the first name a device kind contains: the PCIe and NVL
# H100s and the NVL H200 before the SXM ones, whose kinds say only "H100" / "H200".
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12),
                   ("H200", 989e12), ("A100", 312e12))


def peak_bf16_flops(device_kind: str) -> float | None:
    """The dense bf16 peak of a `jax.Device.device_kind`, None for a device not listed."""
    return next((peak for name, peak in PEAK_BF16_FLOPS if name.lower() in device_kind.lower()), None)


def opt_lora_step_flops(config: OPTConfig, batch: int, seq: int) -> float:
    """FLOPs of one LoRA training step of OPT `config` on (batch, seq) input tokens
    with a next-token loss over the whole (extended) vocabulary.

    The base weights are frozen, so they get no weight gradients, but every matmul
    after the embedding still needs its activation gradient: forward 2 and backward 2
    per weight and token. The adapters (rank r on `config.lora_targets`) get both
    gradients: 6 per adapter weight and token. Attention's two matmuls (QK^T and PV,
    2 * seq * width each per token and layer, the causal mask applied after the full
    product) have both operands computed from the adapters' outputs, so their
    backward costs twice their forward. `project_in` reads the frozen embedding rows
    and so has no backward."""
    if config.code_dim:
        raise ValueError(f"config.code_dim: expected 0 (code tokens as plain rows), got {config.code_dim}; the "
                         "codebook projection's per-step FLOPs are not counted here")
    w, f = config.width, config.mlp_dim
    shapes = {**{name: (w, w) for name in ATTENTION_PROJECTIONS}, "fc1": (w, f), "fc2": (f, w)}
    layer_weights = sum(i * o for i, o in shapes.values())
    adapters = sum(config.lora_rank * (i + o) for name, (i, o) in shapes.items() if name in config.lora_targets)
    attention = 12 * seq * w
    head = config.total_vocab_size * config.token_width  # the tied output layer
    projection = config.width * config.token_width if config.embed_width else 0  # project_in's, project_out's
    per_token = (config.depth * (4 * layer_weights + 6 * adapters + attention)
                 + 4 * (head + projection) + 2 * projection)
    return float(batch * seq * per_token)


def encode_flops(c) -> float:
    """FLOPs of one image's `SeedTokenizer.encode` (ViT, causal Q-Former's queries,
    encode_task_layer and the codebook distances) from a SeedTokenizerConfig."""
    v, q = c.vit, c.qformer
    t, d = v.num_patches + 1, v.width
    vit = 2 * (t - 1) * v.patch_size ** 2 * 3 * d + v.depth * (
        2 * t * d * 4 * d + 4 * t * t * d + 4 * t * d * v.mlp_dim)
    n, w = q.num_queries, q.width
    per_layer = 2 * n * w * 4 * w + 4 * n * n * w + 4 * n * w * q.mlp_dim
    cross = 2 * n * w * 2 * w + 4 * t * d * w + 4 * n * t * w
    qformer = q.num_layers * per_layer + (q.num_layers // q.cross_attention_freq) * cross
    quantize = 2 * n * w * w + 2 * n * w * c.code_dim + 2 * n * c.code_dim * c.num_codes
    return float(vit + qformer + quantize)

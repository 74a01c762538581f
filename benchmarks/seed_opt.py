"""SEED-OPT training and generation throughput, ours against transformers' PyTorch
OPTForCausalLM side by side in one run, with the same random weights (the Hugging
Face model is saved and converted with `python -m seed_jax.convert hf_opt`, which
appends SEED's 8194 image tokens).

  python benchmarks/seed_opt.py                                # CPU: a small OPT
  python benchmarks/seed_opt.py --size=opt_2.7b --batch=8 --seq=512 --bf16   # GPU: the 2.7B shape

Training: one LoRA step (rank 16, alpha 32 on q/k/v/out/fc1/fc2; only the adapters
train on both sides: torch has no per-row trainable embedding, so the appended rows
stay frozen here) on (batch, seq) tokens, AdamW, next-token loss over the whole
extended vocabulary, without dropout (ours is called without a dropout key;
transformers' default 0.1 is set to 0); ours is the jitted step with donated state, torch runs
forward + backward + optimizer step. In float32 both sides' matmuls are float32 (ours
at "highest" precision, as `SeedOPT`'s generation; GPUs would otherwise round them to
TF32). Generation: greedy decoding of `--new_tokens` tokens after a `--prompt` token prompt with the KV cache, all `--batch` rows at once
(ours: one jitted `lax.while_loop`; torch: `generate(do_sample=False)`), timed host
to host. Each figure is the median of `--iters` calls after a warm-up; on a CPU torch runs
as many threads as XLA (`timing.torch_threads_as_xla`). On a GPU the
training MFU counts the step's matmul FLOPs (`benchmarks/flops.py`: forward and activation
gradients of the frozen base, both gradients of the adapters, attention's backward
twice its forward) over the device's dense bf16 peak.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT, os.path.join(_ROOT, "tests")] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
# JAX and torch share the GPU here: JAX's default, taking 75% of its memory up front,
# would leave torch a quarter of it. Both now allocate as they go.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from sd_fixtures import randomize  # noqa: E402
from transformers import OPTConfig, OPTForCausalLM  # noqa: E402

from benchmarks.flops import opt_lora_step_flops, peak_bf16_flops  # noqa: E402
from benchmarks.timing import count, median_seconds, torch_threads_as_xla  # noqa: E402
from seed_jax import weights  # noqa: E402
from seed_jax.api import SeedOPT  # noqa: E402
from seed_jax.api.precision import matmul_precision  # noqa: E402
from seed_jax.convert.__main__ import convert  # noqa: E402

THREADS = torch_threads_as_xla()  # on CPUs, both sides run this many threads
SIZES = {  # transformers OPTConfig fields
    "small": dict(hidden_size=256, num_hidden_layers=4, ffn_dim=1024, num_attention_heads=4),
    "opt_2.7b": dict(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32),
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


class TorchLoRA(torch.nn.Module):
    """y = base(x) + (alpha / rank) x A B with the base frozen (our LoRA, in torch)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.a = torch.nn.Parameter(torch.randn(base.in_features, rank, dtype=base.weight.dtype) / rank)
        self.b = torch.nn.Parameter(torch.zeros(rank, base.out_features, dtype=base.weight.dtype))

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.a) @ self.b


def torch_lora(model: OPTForCausalLM, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.decoder.layers:
        for holder, name in [(layer.self_attn, n) for n in LORA_TARGETS[:4]] + [(layer, n) for n in LORA_TARGETS[4:]]:
            setattr(holder, name, TorchLoRA(getattr(holder, name), rank, alpha))
    return [p for p in model.parameters() if p.requires_grad]


def extend_torch_vocabulary(model: OPTForCausalLM, table: np.ndarray) -> None:
    """The converted export's full token table (with the appended rows) into torch, tied."""
    model.resize_token_embeddings(table.shape[0])
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight.copy_(torch.from_numpy(np.array(table)))


def lora_train_step(graphdef, frozen, tx, dtype: str):
    """The jitted step (lora, opt_state, ids (B,S+1)) -> (lora, opt_state, loss), its
    matmuls at the API's precision for `dtype` (float32: full float32, as torch's
    default; a GPU would otherwise round their inputs to TF32)."""
    def step(lora, opt_state, ids):
        def loss_fn(lora):
            logits, _ = nnx.merge(graphdef, lora, frozen)(ids[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        with jax.default_matmul_precision(matmul_precision(dtype)):
            loss, grads = jax.value_and_grad(loss_fn)(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def ours_train_step(model, ids, dtype: str):
    graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    tx = optax.adamw(1e-4)
    jitted = lora_train_step(graphdef, frozen, tx, dtype)
    state = {"lora": lora, "opt": tx.init(lora)}

    def run():
        state["lora"], state["opt"], loss = jitted(state["lora"], state["opt"], ids)
        return float(loss)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--batch", type=count, default=4)
    parser.add_argument("--seq", type=count, default=128)
    parser.add_argument("--prompt", type=count, default=40)
    parser.add_argument("--new_tokens", type=count, default=32)
    parser.add_argument("--iters", type=count, default=5)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = "bfloat16" if args.bf16 else "float32"
    torch_dtype = torch.bfloat16 if args.bf16 else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"

    with tempfile.TemporaryDirectory() as tmp:
        hf = randomize(OPTForCausalLM(OPTConfig(vocab_size=50272, max_position_embeddings=2048, pad_token_id=1,
                                                dropout=0.0, attention_dropout=0.0, **SIZES[args.size])), 0).eval()
        hf.save_pretrained(os.path.join(tmp, "hf"))
        convert(["hf_opt", f"--checkpoint={os.path.join(tmp, 'hf')}", f"--out={os.path.join(tmp, 'export')}"])
        generator = SeedOPT.load(os.path.join(tmp, "export"), dtype=dtype, batch_size=args.batch)
        table = np.asarray(generator.model.token_table())
        _, config, _ = weights.read_config(os.path.join(tmp, "export"))
    extend_torch_vocabulary(hf, table)
    hf = hf.to(device=device, dtype=torch_dtype)
    vocab = config.total_vocab_size
    rng = np.random.default_rng(0)
    train_ids = rng.integers(4, vocab, (args.batch, args.seq + 1)).astype(np.int32)
    prompt = rng.integers(4, 50272, (args.batch, args.prompt)).astype(np.int32)
    tokens_per_step = args.batch * args.seq

    # ---- generation (before LoRA is attached on the torch side)
    # no end token, as torch_generate's eos_token_id=None: both run every step
    def ours_generate():
        return generator.generate(prompt, args.new_tokens, eos_id=None)

    ours_gen = median_seconds(ours_generate, args.iters)
    torch_prompt = torch.from_numpy(prompt).long().to(device)

    def torch_generate():
        with torch.no_grad():
            out = hf.generate(input_ids=torch_prompt, attention_mask=torch.ones_like(torch_prompt),
                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                              num_beams=1, eos_token_id=None, pad_token_id=1)
        return out.cpu()

    torch_gen = median_seconds(torch_generate, args.iters)
    same = np.array_equal(torch_generate().numpy()[:, args.prompt:], ours_generate())

    # ---- LoRA training step
    model = weights.build("opt", dataclasses.replace(config, lora_rank=16, lora_alpha=32.0), dtype=jnp.dtype(dtype))
    weights.assign(model, {k: v for k, v in weights.flat_params(generator.model).items()})
    ours_train = median_seconds(ours_train_step(model, jnp.asarray(train_ids), dtype), args.iters)
    trainable = torch_lora(hf, 16, 32.0)
    hf.to(device)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    hf.train()
    ids_t = torch.from_numpy(train_ids).long().to(device)

    def torch_step():
        logits = hf(input_ids=ids_t[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids_t[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    torch_train = median_seconds(torch_step, args.iters)

    gen_tokens = args.batch * args.new_tokens
    print(f"device {jax.devices()[0].device_kind} | size {args.size} | {dtype} | batch {args.batch} | "
          f"CPU threads {THREADS}")
    print(f"train  (seq {args.seq}): ours {tokens_per_step / ours_train:9.0f} tok/s  torch "
          f"{tokens_per_step / torch_train:9.0f} tok/s  ratio {torch_train / ours_train:.2f}")
    print(f"generate ({args.prompt}+{args.new_tokens}): ours {gen_tokens / ours_gen:9.1f} tok/s  torch "
          f"{gen_tokens / torch_gen:9.1f} tok/s  ratio {torch_gen / ours_gen:.2f}  "
          f"latency ours {ours_gen * 1e3:.0f} ms torch {torch_gen * 1e3:.0f} ms  same tokens: {same}")
    peak = peak_bf16_flops(jax.devices()[0].device_kind)
    if peak and args.bf16:
        flops = opt_lora_step_flops(model.config, args.batch, args.seq)
        print(f"train MFU {flops / ours_train / peak:.1%} of {peak / 1e12:.0f} TFLOP/s")


if __name__ == "__main__":
    main()

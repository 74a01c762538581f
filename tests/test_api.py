"""SeedTokenizer API: preprocessing, chunked batches, input checks, bf16 mode."""

import io
import json
import os
import re
import shutil
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from helpers import (TINY_DIFFUSION, TINY_TOKENIZER, TWO_PROCESSES_INFER, inference_outputs, own_pixels,
                     run_two_processes)
from parity import relative_error
from seed_jax import parallel, weights
from seed_jax.api import SeedOPT, SeedTokenizer, StableDiffusion, run_in_chunks
from seed_jax.api.processes import fingerprint
from seed_jax.data.preprocess import CLIP_MEAN, CLIP_STD, decode_image, normalize, resize
from seed_jax.models.opt import OPTConfig
from seed_jax.models.tokenizer import SeedTokenizer as SeedTokenizerModel


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "tiny"
    model = SeedTokenizerModel(TINY_TOKENIZER, rngs=nnx.Rngs(0))
    # A codebook spread like the encoder outputs, so that codes are well separated.
    codebook = model.quantize.codebook
    codebook[...] = jax.random.normal(jax.random.key(1), codebook.shape)
    weights.save(str(out), "seed_tokenizer", TINY_TOKENIZER, weights.flat_params(model))
    return str(out)


@pytest.fixture(scope="module")
def tokenizer(export_dir):
    return SeedTokenizer.load(export_dir, batch_size=4)


def _pixels(n, size=32, seed=0):
    return np.asarray(jax.random.normal(jax.random.key(seed), (n, size, size, 3)))


def test_preprocess_resizes_bicubic_and_normalises(tokenizer):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 56, 3), np.uint8), rng.integers(0, 256, (20, 20, 3), np.uint8)]
    pixels = tokenizer.preprocess(images)
    assert pixels.shape == (2, 32, 32, 3) and pixels.dtype == np.float32
    expected = (np.asarray(Image.fromarray(images[0]).resize((32, 32), Image.BICUBIC), np.float32) / 255
                - CLIP_MEAN) / CLIP_STD
    np.testing.assert_allclose(pixels[0], expected, rtol=1e-6)
    assert tokenizer.preprocess(np.stack([images[1]] * 3)).shape == (3, 32, 32, 3)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_pil_images_of_any_mode_are_read_as_training_reads_their_files(tokenizer):
    """A PIL image failed ("'Image' object is not iterable"), and one that is not RGB
    (grayscale, RGBA, a palette, 16-bit) failed for its array's shape. Each is now
    converted as training converts a decoded file: the pixels of its PNG's records."""
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (40, 56, 4), np.uint8), "RGBA")
    images = [rgba, rgba.convert("L"), rgba.convert("RGB").convert("P"), rgba.convert("RGB"),
              Image.fromarray(rng.integers(0, 2**16, (24, 20), np.uint16))]
    assert images[-1].mode == "I;16"
    pixels = tokenizer.preprocess(images)
    for i, image in enumerate(images):
        from_file = normalize(resize(decode_image(_png_bytes(image)), 32))
        np.testing.assert_array_equal(pixels[i], from_file, err_msg=image.mode)
    np.testing.assert_array_equal(tokenizer.preprocess(images[0]), pixels[:1])  # one image alone
    np.testing.assert_array_equal(tokenizer.preprocess([np.asarray(images[3])]), pixels[3:4])


def test_a_pil_image_whose_file_does_not_decode_is_named(tokenizer):
    """PIL decodes an opened file when it is first read, after the images were checked:
    a truncated JPEG among many failed as PIL's "OSError: image file is truncated",
    naming no image. The error now names it, as a bad array is named."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(buffer, "JPEG")
    data = buffer.getvalue()
    images = [Image.open(io.BytesIO(data[:len(data) // 2] if i == 3 else data)) for i in range(5)]
    message = r"images\[3\]: undecodable image \(OSError: image file is truncated"
    with pytest.raises(ValueError, match=message):
        tokenizer.encode_images(images)
    with pytest.raises(ValueError, match=message):
        tokenizer.preprocess(images)


def test_a_jax_array_of_one_image_is_one_image(tokenizer):
    """A jax (H,W,3) array was read row by row, as H images ("images[0]: expected uint8
    (H,W,3), got uint8 (W, 3)"); any array is now read as numpy's."""
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), np.uint8)
    np.testing.assert_array_equal(tokenizer.preprocess(jnp.asarray(image)), tokenizer.preprocess(image))
    np.testing.assert_array_equal(tokenizer.preprocess(jnp.asarray(image[None])), tokenizer.preprocess(image))


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 8, 8, 3), np.float32), "images[0]: expected uint8"),
    (np.zeros((2, 8, 8, 4), np.uint8), "images[0]: expected uint8 (H,W,3)"),
    (np.zeros((8, 8), np.uint8), "images: expected uint8 (B,H,W,3)"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((0, 8, 3), np.uint8)], "images[1]: expected a non-empty"),
    (np.zeros((2, 8, 0, 3), np.uint8), "images[0]: expected a non-empty"),
    ("photo.jpg", "images: expected uint8 (B,H,W,3), one image or a non-empty list of images"),
    ([], "images: expected uint8 (B,H,W,3), one image or a non-empty list of images"),
    (7, "images: expected uint8 (B,H,W,3)"),
    ([Image.new("RGB", (0, 5))], "images[0]: expected a non-empty image, got 0x5 pixels"),
    (np.array([np.zeros((8, 8, 3), np.uint8), np.zeros((6, 8, 3), np.float32)], dtype=object),
     "images[1]: expected uint8 (H,W,3) or a PIL image, got float32 (6, 8, 3)"),
])
def test_preprocess_rejects_bad_images(tokenizer, bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        tokenizer.preprocess(bad)


def test_an_object_array_of_images_of_different_sizes_is_a_list_of_them(tokenizer):
    """np.array([a, b], dtype=object) of images of different sizes (numpy's 1-D array of
    them) was refused as "images: expected uint8 (B,H,W,3) ..., got (2,)", though a list
    of the same images is taken: it is now read as that list."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 56, 3), np.uint8), Image.fromarray(rng.integers(0, 256, (30, 20, 3), np.uint8))]
    objects = np.empty(2, object)
    objects[:] = images
    np.testing.assert_array_equal(tokenizer.preprocess(objects), tokenizer.preprocess(images))
    np.testing.assert_array_equal(tokenizer.encode_images(objects), tokenizer.encode_images(images))


def test_encode_images_holds_one_chunk_of_pixels_and_checks_every_image_first(tokenizer, monkeypatch):
    """caption, answer and reconstruct preprocessed every image before encoding any: the
    whole batch's float32 pixels on the host (600 KB an image at 224 px: 6 GB for 10k
    images). encode_images gives the same codes, preprocessing each chunk of 4 as it
    is encoded, after checking every image."""
    images = np.random.default_rng(0).integers(0, 256, (256, 40, 40, 3), dtype=np.uint8)
    whole = tokenizer.preprocess(images)
    codes = tokenizer.encode_images(images)  # compiled here, measured below
    np.testing.assert_array_equal(codes, tokenizer.encode(whole))
    tracemalloc.start()
    try:
        np.testing.assert_array_equal(tokenizer.encode_images(list(images)), codes)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < whole.nbytes / 4, f"peak {peak} bytes, the whole batch's pixels are {whole.nbytes}"
    encoded, encode = [], tokenizer._encode
    monkeypatch.setattr(tokenizer, "_encode", lambda *args, **kwargs: encoded.append(1) or encode(*args, **kwargs))
    bad = list(images[:6]) + [np.zeros((4, 4), np.uint8)]
    with pytest.raises(ValueError, match=r"images\[6\]: expected uint8 \(H,W,3\)"):
        tokenizer.encode_images(bad)
    assert not encoded, "images were encoded before a later one was found bad"


def test_encode_images_preprocesses_each_image_once(tokenizer, monkeypatch):
    """A chunk is padded with copies of its first image, and each copy was decoded and
    resized again: 33 images at batch_size 32 were preprocessed 64 times. Each image is
    now preprocessed once, with the same codes."""
    from seed_jax.data import preprocess

    images = np.random.default_rng(0).integers(0, 256, (9, 40, 40, 3), dtype=np.uint8)
    expected = tokenizer.encode(tokenizer.preprocess(images))
    resized, resize = [], preprocess.resize
    monkeypatch.setattr(preprocess, "resize", lambda *args: resized.append(1) or resize(*args))
    np.testing.assert_array_equal(tokenizer.encode_images(images), expected)  # chunks of 4, 4 and 1 (+ 3 copies)
    np.testing.assert_array_equal(tokenizer.encode_images(images[:3]), expected[:3])  # 3 (+ 1 copy)
    assert len(resized) == 9 + 3


def test_encode_copies_no_float32_pixels(tokenizer):
    """encode copied a batch's float32 pixels whole before its first chunk ran (numpy's
    astype copies unless told not to): 10k images at 224 px held 12 GB on the host, not 6."""
    pixels = _pixels(256)
    codes = tokenizer.encode(pixels)  # compiled here, measured below
    tracemalloc.start()
    try:
        np.testing.assert_array_equal(tokenizer.encode(pixels), codes)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = pixels.nbytes
    assert peak < size / 4, f"peak {peak} bytes, the pixels are {size}"


def test_encode_any_batch_size_equals_one_at_a_time(tokenizer):
    pixels = _pixels(6)
    out = tokenizer.encode(pixels, return_intermediates=True)  # chunks of 4: one full, one padded
    assert out["codes"].shape == (6, 32) and out["codes"].dtype == jnp.int32
    assert out["vit_features"].shape == (6, 17, 32) and out["image_embeds"].shape == (6, 17, 32)
    assert out["causal_embeddings"].shape == (6, 32, 32)
    assert out["quant_input"].shape == out["quantized"].shape == (6, 32, 8)
    for i in (0, 5):
        single = tokenizer.encode(pixels[i:i + 1], return_intermediates=True)
        np.testing.assert_array_equal(single["codes"][0], out["codes"][i])
        np.testing.assert_allclose(single["causal_embeddings"][0], out["causal_embeddings"][i], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(tokenizer.encode(pixels), out["codes"])
    embeds = tokenizer.embed_codes(out["codes"])
    assert embeds.shape == (6, 77, 24) and embeds.dtype == jnp.float32


def test_encode_of_codes_alone_keeps_no_intermediates_per_chunk(export_dir):
    """Every chunk's outputs stay on the device until the chunks are joined, so a chunk
    that returned all intermediates (the ViT features alone are 1.4 MB an image at ViT-g)
    held ~3 MB of device memory per image encoded: 10k images overflowed a 16 GB GPU
    to return 1.3 MB of codes. Without `return_intermediates` a chunk returns codes alone."""
    tokenizer = SeedTokenizer.load(export_dir, batch_size=4)
    returned = []
    encode = tokenizer._encode

    def recording(*args, **kwargs):
        out = encode(*args, **kwargs)
        returned.append(sum(x.nbytes for x in jax.tree.leaves(out)))
        return out

    tokenizer._encode = recording
    codes = tokenizer.encode(_pixels(6))
    assert codes.shape == (6, 32) and codes.dtype == jnp.int32
    assert returned == [4 * 32 * 4, 4 * 32 * 4]  # two chunks of 4 rows of int32 codes
    np.testing.assert_array_equal(codes, tokenizer.encode(_pixels(6), return_intermediates=True)["codes"])


def test_code_retrieval_compiles_programs_without_the_tokenizers_weights(tokenizer):
    """CodeRetrieval's jitted programs closed over the tokenizer's state, so every weight
    they read was a constant of the program (SEED's Q-Former text path: 0.9 GB of program
    text, 5 s to compile instead of 0.8 s); the weights are now the programs' arguments,
    as the API's own programs take them."""
    from seed_jax.evaluators.code_retrieval import CodeRetrieval

    scorer = CodeRetrieval(tokenizer.model, caption_tokenizer=None, batch_size=4)
    ids = np.ones((4, 8), np.int32)
    programs = {"codes": scorer._from_codes.lower(scorer._state, np.zeros((4, 32), np.int32)).as_text(),
                "text": scorer._from_text.lower(scorer._state, ids, ids).as_text()}
    for name, program in programs.items():
        assert not re.search(r'dense<"0x', program), f"{name}: a weight is a constant of the program"


def test_chunk_outputs_leave_the_device_as_the_next_chunk_runs():
    """Every chunk's outputs used to stay on the device until all were joined there, so
    device memory grew with the batch, not `batch_size`: SeedOPT.logits of 1000 rows of
    OPT's 50k-token vocabulary held 20 GB, SD's decode 3 MB an image. Now at most two
    chunks' outputs are on the device, and the rows come back as numpy arrays."""
    shape = (3, 7, 1001)  # a chunk's outputs: a shape no other live array has
    live = []

    def fn(x):
        out = jnp.broadcast_to(jnp.asarray(x, jnp.float32)[:, None, None], shape) + 1
        live.append(sum(a.shape == shape for a in jax.live_arrays()))
        return {"out": out, "row": x}

    rows = np.arange(20)  # 7 chunks, the last padded
    joined = run_in_chunks(fn, (rows,), batch_size=3)
    assert max(live) <= 2 and len(live) == 7
    assert isinstance(joined["out"], np.ndarray) and joined["out"].shape == (20, 7, 1001)
    np.testing.assert_array_equal(joined["row"], rows)
    np.testing.assert_array_equal(joined["out"][:, 0, 0], rows + 1)


def test_batches_below_the_chunk_size_share_a_program_per_power_of_two():
    """A batch smaller than `batch_size` ran as one chunk of its own size: every batch
    size compiled the API's programs again (the ViT-g encoder, OPT's decoding loop).
    Batches of 1 to 40 rows now take 6 programs at `batch_size` 32 (1, 2, 4, ..., 32 rows)."""
    fn = jax.jit(lambda x: x * 2)
    for n in range(1, 41):
        np.testing.assert_array_equal(run_in_chunks(fn, (np.arange(n),), batch_size=32), 2 * np.arange(n))
    assert fn._cache_size() == 6


def test_encode_takes_bfloat16_pixels(tokenizer):
    """bfloat16 is floating point (numpy's issubdtype says otherwise for ml_dtypes'
    bfloat16, which rejected such pixels as if they were unnormalised uint8)."""
    pixels = jnp.asarray(_pixels(2), jnp.bfloat16)
    np.testing.assert_array_equal(tokenizer.encode(pixels), tokenizer.encode(np.asarray(pixels, np.float32)))


@pytest.mark.parametrize("pixels, message", [
    (np.zeros((2, 16, 16, 3), np.float32), r"pixels: expected \(B,32,32,3\)"),
    (np.zeros((2, 32, 32, 3), np.uint8), "pass uint8 images through preprocess"),
    (np.full((1, 32, 32, 3), 200.0, np.float32), r"values in \[200, 200\]"),
    (np.full((1, 32, 32, 3), np.nan, np.float32), "pixels: values"),
    (np.zeros((0, 32, 32, 3), np.float32), "pixels: the batch is empty"),
    ([np.zeros((32, 32, 3)), np.zeros((31, 32, 3))], r"pixels: expected an array \(nested lists with rows of one"),
])
def test_encode_rejects_bad_pixels(tokenizer, pixels, message):
    with pytest.raises(ValueError, match=message):
        tokenizer.encode(pixels)


@pytest.mark.parametrize("codes, message", [
    (np.full((2, 32), 64), r"codes: values must lie in \[0, 64\)"),
    (np.full((2, 32), -1), r"codes: values must lie in \[0, 64\)"),
    (np.zeros((2, 31), np.int32), r"codes: expected \(B,32\)"),
    (np.zeros((2, 32), np.float32), "codes: expected integers"),
    (np.zeros((0, 32), np.int32), "codes: the batch is empty"),
    # codes parsed from text, one row short: numpy's "inhomogeneous shape" error named no argument
    ([[0] * 32, [0] * 31], r"codes: expected an array \(nested lists with rows of one length\), got list"),
])
def test_embed_codes_rejects_bad_codes(tokenizer, codes, message):
    """As embed_codes, CodeRetrieval's code_features (the t2i and notebook retrieval from
    codes) checks its codes: it took codes out of range as the last code (a lookup clamps
    them), float codes truncated, and failed on 31 codes as a bare broadcasting error."""
    from seed_jax.evaluators.code_retrieval import CodeRetrieval

    with pytest.raises(ValueError, match=message):
        tokenizer.embed_codes(codes)
    with pytest.raises(ValueError, match=message):
        CodeRetrieval(tokenizer.model, caption_tokenizer=None, batch_size=4).code_features(codes)
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 1, got 0"):  # was range()'s error
        CodeRetrieval(tokenizer.model, caption_tokenizer=None, batch_size=0)


def test_load_rejects_what_is_not_a_tokenizer_export(tmp_path, export_dir):
    with pytest.raises(FileNotFoundError, match="not an export"):
        SeedTokenizer.load(str(tmp_path))
    with pytest.raises(ValueError, match="dtype: expected one of"):
        SeedTokenizer.load(export_dir, dtype="float16")


def test_a_path_that_holds_no_export_says_where_one_is(tmp_path, export_dir):
    """A training workdir given for its export (the trainers write it to WORKDIR/export)
    and a folder that does not exist were both told to write an export with seed_jax.convert or seed_jax.export."""
    workdir = tmp_path / "workdir"
    shutil.copytree(export_dir, workdir / "export")
    with pytest.raises(FileNotFoundError, match=rf"{workdir}: not an export \(model.json missing\); it holds one "
                                                rf"in {workdir / 'export'}$"):
        SeedTokenizer.load(str(workdir))
    with pytest.raises(FileNotFoundError, match=r"missing\); no such folder$"):
        SeedTokenizer.load(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="write one with `python -m seed_jax.convert"):
        SeedTokenizer.load(str(tmp_path))
    (tmp_path / "weights.safetensors").write_text("a file")  # said "no such folder"
    with pytest.raises(FileNotFoundError, match=r"missing\); a file, not a folder: an export is the folder holding"):
        SeedTokenizer.load(str(tmp_path / "weights.safetensors"))


def test_load_paths_under_the_home_directory(tmp_path, export_dir, monkeypatch):
    """Each load read a path starting with ~ as a folder "~" in the current directory
    (with a hint to call os.path.expanduser); `~` is now the home directory."""
    home = tmp_path / "home"
    shutil.copytree(export_dir, home / "exports" / "seed")
    monkeypatch.setenv("HOME", str(home))
    assert SeedTokenizer.load("~/exports/seed").num_queries == TINY_TOKENIZER.qformer.num_queries
    with pytest.raises(FileNotFoundError, match=rf"^{home}/sd: not an export"):
        SeedTokenizer.load("~/exports/seed", diffusion="~/sd")
    with pytest.raises(FileNotFoundError, match=rf"^{home}/sd: not an export"):
        StableDiffusion.load("~/sd")
    with pytest.raises(FileNotFoundError, match=rf"^{home}/opt: not an export"):
        SeedOPT.load("~/opt")
    (home / "opt").mkdir()
    weights.write_config(str(home / "opt"), "opt", OPTConfig(vocab_size=20, width=16, depth=1, num_heads=2,
                                                              mlp_dim=32))
    (home / "tokenizer.json").write_text('{"a": 0}')  # found and read (and refused) before the weights are
    with pytest.raises(ValueError, match="is not a tokenizer.json"):
        SeedOPT.load("~/opt", text_tokenizer="~/tokenizer.json")


def test_an_export_without_its_parameters_is_named(tmp_path, export_dir):
    """An export folder holding model.json alone (as `weights.write_config` writes a
    model's plan), or an empty params/, failed in orbax's metadata as "TypeError:
    'NoneType' object is not iterable"; it now names the folder and what is missing."""
    out = tmp_path / "plan"
    out.mkdir()
    weights.write_config(str(out), "seed_tokenizer", TINY_TOKENIZER)
    message = rf"{out}: holds no parameters \(params/ missing or no orbax checkpoint\), only model.json"
    with pytest.raises(FileNotFoundError, match=message):
        SeedTokenizer.load(str(out))
    (out / "params").mkdir()
    with pytest.raises(FileNotFoundError, match=message):
        SeedTokenizer.load(str(out))


def test_load_checks_every_argument_before_reading_any_weights(tmp_path, monkeypatch):
    """SeedOPT.load read the language model's weights (OPT-2.7B: 10 GB), and then the
    SEED tokenizer's and SD's, before it found a mistyped text_tokenizer, tokenizer or
    diffusion path or a batch_size of 0; SeedTokenizer.load and StableDiffusion.load
    read theirs before checking batch_size and the diffusion export. Each is now
    refused first (the exports here are model.json alone: no weights to read)."""
    plans = {}
    for kind, config in [("opt", OPTConfig(vocab_size=20, width=16, depth=1, num_heads=2, mlp_dim=32)),
                         ("seed_tokenizer", TINY_TOKENIZER), ("stable_diffusion", TINY_DIFFUSION)]:
        plans[kind] = str(tmp_path / kind)
        os.makedirs(plans[kind])
        weights.write_config(plans[kind], kind, config)

    def load_model(path, **_):
        raise AssertionError(f"weights of {path} read")

    monkeypatch.setattr(weights, "load_model", load_model)
    nowhere = str(tmp_path / "nowhere")
    vocab = tmp_path / "vocab.json"
    vocab.write_text('{"a": 0}')
    opt, tok, sd = plans["opt"], plans["seed_tokenizer"], plans["stable_diffusion"]
    for load, options, message in [
        (SeedOPT.load, dict(text_tokenizer=nowhere), "text_tokenizer: .* does not exist"),
        (SeedOPT.load, dict(text_tokenizer=str(vocab)), "is not a tokenizer.json"),
        (SeedOPT.load, dict(tokenizer=nowhere), "nowhere: not an export"),
        (SeedOPT.load, dict(tokenizer=sd), "holds a 'stable_diffusion' model, expected 'seed_tokenizer'"),
        (SeedOPT.load, dict(tokenizer=tok, diffusion=tok), "holds a 'seed_tokenizer' model, expected 'stable_diff"),
        (SeedOPT.load, dict(batch_size=0), "batch_size: expected an integer >= 1"),
        (SeedTokenizer.load, dict(diffusion=nowhere), "nowhere: not an export"),
        (SeedTokenizer.load, dict(batch_size=0), "batch_size: expected an integer >= 1"),
        (SeedTokenizer.load, dict(axis_rules=[("embed", "model")]), r"axis_rules: \('embed', 'model'\) is not a"),
        (StableDiffusion.load, dict(batch_size=0), "batch_size: expected an integer >= 1"),
    ]:
        path = {SeedOPT.load: opt, SeedTokenizer.load: tok, StableDiffusion.load: sd}[load]
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            load(path, **options)


def test_load_onto_a_mesh_reads_each_weight_into_its_split_and_encodes_as_one_device(export_dir, tokenizer):
    """`SeedTokenizer.load` took no mesh: every weight (ViT-g's alone 4 GB) was read whole
    onto one device. Given a mesh, each is read split by the axis rules, and each device
    computes its own rows of a chunk (here 1 of 4) with the weights gathered over fsdp;
    codes are those of the load without a mesh, the float outputs within 1e-5 (the tensor
    split sums the heads' and MLP's partial products in another order: ~3e-6 measured on
    outputs up to 8). A batch of 1 (a chunk of 1, which 4 rows' devices cannot split) runs
    whole on every device."""
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    split = SeedTokenizer.load(export_dir, batch_size=4, mesh=mesh)
    model, P = split.model, jax.sharding.PartitionSpec
    for variable, spec in [(model.visual_encoder.blocks.blocks.mlp.fc1.kernel, P(None, "fsdp", "tensor")),
                           (model.qformer.groups.layers[0].cross_attn.query, P(None, "fsdp", "tensor", None)),
                           (model.qformer.word_embeddings, P("tensor", "fsdp")),
                           (model.distill_text_proj.kernel, P("fsdp", "tensor"))]:
        assert variable.get_value().sharding == jax.sharding.NamedSharding(mesh, spec), variable.get_value().sharding
    pixels = _pixels(6)  # chunks of 4: one full, one padded
    program = split._encode.lower(split._state, pixels[:4], intermediates=True).compile().as_text()
    assert set(re.findall(r"f32\[\d+,32,32,3\]", program)) == {"f32[1,32,32,3]"}, "a device holds others' rows"
    expected, out = tokenizer.encode(pixels, return_intermediates=True), split.encode(pixels, return_intermediates=True)
    assert set(out) == set(expected)
    for name, value in out.items():
        assert isinstance(value, np.ndarray) and value.dtype == expected[name].dtype
        assert value.shape == expected[name].shape
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(out["codes"], expected["codes"])
    np.testing.assert_array_equal(split.encode(pixels[:1]), expected["codes"][:1])
    embeds = split.embed_codes(expected["codes"])
    assert isinstance(embeds, np.ndarray) and embeds.dtype == np.float32
    np.testing.assert_allclose(embeds, tokenizer.embed_codes(expected["codes"]), rtol=1e-5, atol=1e-5)
    features = split.image_features(pixels)
    assert isinstance(features, np.ndarray) and features.dtype == np.float32
    np.testing.assert_allclose(features, tokenizer.image_features(pixels), rtol=1e-5, atol=1e-5)


def test_seed_opt_loads_its_seed_tokenizer_onto_its_mesh(tmp_path, export_dir):
    """`SeedOPT.load(tokenizer=PATH, mesh=...)` split the OPT's weights over the mesh but
    read the SEED tokenizer's whole onto one device; it is now read split by the same rules."""
    opt = str(tmp_path / "opt")
    config = OPTConfig(vocab_size=20, width=16, depth=1, num_heads=2, mlp_dim=32)
    weights.save(opt, "opt", config, weights.flat_params(weights.build("opt", config)))
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    tokenizer = SeedOPT.load(opt, tokenizer=export_dir, mesh=mesh).tokenizer
    kernel = tokenizer.model.visual_encoder.blocks.blocks.mlp.fc1.kernel
    spec = jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert kernel.get_value().sharding == jax.sharding.NamedSharding(mesh, spec)


@pytest.mark.slow
def test_two_processes_infer_on_one_mesh_as_one_device(tmp_path, export_dir, repo_root):
    """Multi-host inference: two processes (4 CPU devices each) load a SeedOPT with its SEED
    tokenizer onto one data 2 x fsdp 2 x tensor 2 mesh of all 8 devices, data and fsdp
    crossing the processes (each holds half of a chunk's rows: an output left split over
    them does not read back), and call it with the same inputs. Both get every row back:
    tokens (greedy, sampled, beam search) and codes equal those of one process on one
    device, the float outputs within 1e-5 (as on one process's mesh), for batches of 3 and 6
    rows (chunks of 4, each row computed by 2 devices) and of 1 (computed whole on every
    device). Calls whose inputs or options differ between the processes raise on both,
    naming the argument, instead of returning a mix of both processes' rows; a tokenizer
    on each process's own devices encodes that process's own images."""
    config = OPTConfig(vocab_size=60, width=32, depth=2, num_heads=4, mlp_dim=64, max_positions=32, extra_tokens=6)
    rng = np.random.default_rng(1)  # spread wider than the initialisation's, each prompt continues its own way
    params = {k: rng.normal(0, 0.5, np.shape(v)).astype(np.float32)
              for k, v in weights.flat_params(weights.build("opt", config)).items()}
    weights.save(str(tmp_path / "opt"), "opt", config, params)
    expected = inference_outputs(SeedOPT.load(str(tmp_path / "opt"), tokenizer=export_dir, batch_size=4))
    assert len({tuple(row) for row in expected["greedy"]}) == 3 and (expected["beams"] != expected["greedy"]).any()
    run_two_processes(repo_root, [str(tmp_path), export_dir], program=("-c", TWO_PROCESSES_INFER))
    for process in range(2):
        with np.load(tmp_path / f"{process}.npz") as saved:
            got = dict(saved)
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            where = f"process {process}: {name}"
            assert got[name].shape == value.shape and got[name].dtype == value.dtype, where
            if value.dtype.kind == "f":
                np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=where)
            else:
                np.testing.assert_array_equal(got[name], value, err_msg=where)
        differing = {"logits": "input_ids", "generate": "attention_mask", "sampled": "seed", "encode": "pixels",
                     "encode_images": "images", "embed_codes": "codes", "image_features": "pixels"}
        errors = json.loads((tmp_path / f"{process}.json").read_text())
        assert errors.keys() == differing.keys()
        for call, argument in differing.items():
            assert errors[call].startswith(f"{argument}: process 1 passed other values than process 0"), (
                f"process {process}: {call}: {errors[call]!r}")
        own = SeedTokenizer.load(export_dir, batch_size=4).encode(own_pixels(process))
        np.testing.assert_array_equal(np.load(tmp_path / f"{process}_own.npy"), own, err_msg=f"process {process}")


def test_input_fingerprints_tell_apart_dtype_shape_and_contents():
    """Processes compare their inputs by fingerprint (`check_same_on_every_process`): equal
    inputs give one, however they are laid out in memory, and any difference another."""
    base = np.arange(6, dtype=np.int32).reshape(2, 3)
    assert (fingerprint(base) == fingerprint(np.asfortranarray(base))).all()
    assert (fingerprint(base[:, ::2]) == fingerprint(base[:, ::2].copy())).all()
    changed = base.copy()
    changed[1, 2] = 7
    values = [base, changed, base.reshape(3, 2), base.astype(np.int64), base.astype(np.float32), 0, 1, 1.0, None,
              "1", [(1, 2)], [(1, 3)]]
    assert len({fingerprint(v).tobytes() for v in values}) == len(values)


def test_bfloat16_mode_error_against_float32(export_dir, tokenizer, record_property):
    """bf16 compute (float32 parameters, LayerNorm, softmax and VQ distances): its
    error against float32 is reported here and bounded."""
    bf16 = SeedTokenizer.load(export_dir, dtype="bfloat16", batch_size=4)
    pixels = _pixels(8, seed=3)
    ref = tokenizer.encode(pixels, return_intermediates=True)
    low = bf16.encode(pixels, return_intermediates=True)
    errors = {k: relative_error(low[k], ref[k]) for k in ("vit_features", "causal_embeddings", "quant_input")}
    errors["generation"] = relative_error(bf16.embed_codes(ref["codes"]), tokenizer.embed_codes(ref["codes"]))
    agreement = float(np.mean(np.asarray(low["codes"]) == np.asarray(ref["codes"])))
    for k, v in {**errors, "code_agreement": agreement}.items():
        record_property(k, v)
    print("bf16 vs float32:", {k: f"{v:.1e}" for k, v in errors.items()}, f"code agreement {agreement:.3f}")
    assert low["vit_features"].dtype == jnp.bfloat16
    for k, v in errors.items():
        assert 0 < v < 3e-2, f"{k}: bf16 relative error {v:.2e}"
    assert agreement > 0.8

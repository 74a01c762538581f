"""Training workdirs -> exports (`seed_jax.export`), and training started from
exports (`config.init.qformer`, `init.stage1`, `init.clip_text`)."""

import functools
import json
import os
import re
import shlex
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags as absl_flags
from flax import nnx
from ml_collections import config_flags

from configs.decoder import get_config as get_decoder_config
from configs.seed_opt import get_config as get_opt_config
from configs.tokenizer import get_config
from helpers import assert_export_holds_both_stages, checkpoint_params
from seed_jax import parallel, weights
from seed_jax.api import SeedTokenizer
from seed_jax.export import export
from seed_jax.models.blip2 import Blip2Config, Blip2QFormer
from seed_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder
from seed_jax.models.qformer import QFormerConfig
from seed_jax.models.vit import ViTConfig
from seed_jax.trainers import coordination, run_config
from seed_jax.trainers import decoder as decoder_trainer
from seed_jax.trainers import seed_opt as seed_opt_trainer
from seed_jax.trainers import tokenizer as trainer


@pytest.fixture(scope="module")
def trained_workdir(tiny_decoder_run):
    """A finished tiny tokenizer run (the decoder's tokenizer is the `tiny` preset's, trained
    once for all workers), read only: a test that changes it works on a copy."""
    return os.path.join(tiny_decoder_run, "tokenizer")


def test_export_holds_what_each_stage_trained(trained_workdir, tmp_path, repo_root, caplog):
    out = str(tmp_path / "out")
    assert_export_holds_both_stages(trained_workdir, out, repo_root)
    with caplog.at_level("WARNING"):
        tokenizer = SeedTokenizer.load(out)
    assert "stage I only" not in caplog.text
    codes = tokenizer.encode(np.zeros((2, 32, 32, 3), np.float32))
    assert codes.shape == (2, 32) and tokenizer.embed_codes(codes).shape == (2, 77, 16)


def test_an_export_reads_the_checkpoints_parameters_alone(trained_workdir, tmp_path, monkeypatch):
    """The export restored each stage's whole train state, AdamW's moments (twice the
    trained parameters' bytes) included, onto one device, then dropped all but the
    parameters. It now reads the parameters alone, and exports them unchanged."""
    read = []
    restore = ocp.CheckpointManager.restore

    def recording_restore(manager, step, args=None):
        restored = restore(manager, step, args=args)
        read.append(sorted(restored["state"]))
        return restored

    monkeypatch.setattr(ocp.CheckpointManager, "restore", recording_restore)
    out = str(tmp_path / "out")
    export(trained_workdir, out)
    assert read == [["params"], ["params"]]
    exported = weights.load_params(out)
    for stage in ("stage1", "stage2"):
        for name, value in checkpoint_params(trained_workdir, stage).items():
            np.testing.assert_array_equal(exported[name], value, err_msg=f"{stage} {name}")


def test_an_export_of_a_checkpoint_that_does_not_fit_the_model_names_the_array(trained_workdir, tmp_path):
    """The error ended with advice for training ("resume with the config that wrote it") on an export,
    which builds the model from the workdir's own config.json: it now says so, and to export with the
    config the run was trained with."""
    workdir = str(tmp_path / "trained")
    shutil.copytree(trained_workdir, workdir)
    path = os.path.join(workdir, "config.json")
    config = json.load(open(path))
    trained_codes, code_dim = config["model"]["num_codes"], config["model"]["code_dim"]
    config["model"]["num_codes"] = 2 * trained_codes
    json.dump(config, open(path, "w"))
    with pytest.raises(ValueError, match=rf"(?s)stage2 step \d+: the train state's arrays.*"
                                         rf"params.tokenizer.quantize.codebook.value: expected \({2 * trained_codes}, "
                                         rf"{code_dim}\), got \({trained_codes}, {code_dim}\)") as error:
        export(workdir, str(tmp_path / "out"))
    message = str(error.value)
    assert f"than {path}, which the export builds the model from: export with the config the run was trained " \
           "with" in message
    assert "resume" not in message


def test_an_export_of_an_unfinished_run_warns(trained_workdir, tmp_path, caplog):
    """An export of a run stopped mid-stage (preempted, or resumed with more steps) said
    "stage2 step N" alone, as for a finished run: nothing told the stage had steps to go."""
    workdir = str(tmp_path / "trained")
    shutil.copytree(trained_workdir, workdir)
    path = os.path.join(workdir, "config.json")
    config = json.load(open(path))
    trained = config["stage2"]["num_steps"]
    config["stage2"]["num_steps"] = trained + 4
    json.dump(config, open(path, "w"))
    with caplog.at_level("WARNING"):
        restored = export(workdir, str(tmp_path / "out"))
    assert restored["stage2"] == trained
    assert (f"workdir {workdir}: stage2 trained {trained} of its {trained + 4} steps (the run is unfinished)"
            in caplog.text)
    assert "stage1 trained" not in caplog.text


def test_a_rerun_in_a_trained_workdir_keeps_the_settings_it_was_trained_with(trained_workdir, tmp_path):
    """config.json is what exports and the trainers built on a finished run rebuild its
    models from. A rerun in the workdir with another seed (the frozen CLIP's draw) or
    model wrote its settings over it, then trained nothing (its checkpoints were final):
    the decoder and SEED-OPT then rebuilt a CLIP the run never used. Now it is refused
    and config.json kept; settings that do not define the model are recorded."""
    workdir = str(tmp_path / "trained")
    shutil.copytree(trained_workdir, workdir)
    path = os.path.join(workdir, "config.json")
    trained = open(path).read()
    for section, key, value, named in [(None, "seed", 1, "seed: 0 -> 1"),
                                       ("clip_text", "eps", 1e-6, "clip_text.eps: 1e-05 -> 1e-06")]:
        config = get_config("tiny")
        (config[section] if section else config)[key] = value
        with pytest.raises(ValueError, match=f"workdir {workdir}: its checkpoints were trained with other settings "
                                             f"than this run's \\({named}\\)"):
            trainer.train(config, workdir)
        assert open(path).read() == trained
    config = get_config("tiny")
    config.log_every_steps = 1
    assert trainer.train(config, workdir)
    assert json.loads(open(path).read())["log_every_steps"] == 1


def test_a_workdir_without_checkpoints_takes_a_new_config(tmp_path):
    """A run that failed before its first checkpoint (e.g. on a bad setting) trained
    nothing: the next run's settings replace its config.json."""
    failed = get_config("tiny")
    failed.seed = 1
    run_config.write(str(tmp_path), failed, trainer.RUN_DEFINING)
    run_config.write(str(tmp_path), get_config("tiny"), trainer.RUN_DEFINING)
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 0


def test_an_export_of_another_trainers_workdir_or_of_an_export_says_what_it_is(tmp_path):
    """A decoder or SEED-OPT workdir, which write their export themselves, and an export were
    refused as a workdir of another trainer, or as no training workdir at all."""
    for get_trainer_config, trainer_module in ((get_decoder_config, decoder_trainer),
                                               (get_opt_config, seed_opt_trainer)):
        config = get_trainer_config("tiny")
        workdir = tmp_path / config.trainer
        workdir.mkdir()
        run_config.write(str(workdir), config, trainer_module.RUN_DEFINING)
        exported_itself = f"{config.trainer} trainer exports to {workdir}/export itself)"
        with pytest.raises(ValueError, match=re.escape(f"trainer {config.trainer!r}, expected 'tokenizer' (the "
                                                       + exported_itself)):
            export(str(workdir), str(tmp_path / "out"))
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / weights.CONFIG_FILE).write_text("{}")
    with pytest.raises(ValueError, match=f"workdir {exported}: an export \\(model.json\\), not a training workdir"):
        export(str(exported), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def _save_a_checkpoint(workdir: str) -> None:
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "stage1")) as manager:
        manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave({"x": np.zeros(2)})))


def test_a_config_json_that_is_no_json_is_named(tmp_path):
    """A refused rerun says config.json records the settings the checkpoints were trained
    with, so it may be edited by hand; one left invalid failed with json's message alone
    ('Expecting property name enclosed in double quotes: line 1 column 12'), all that
    `python -m seed_jax.main` prints of a refused setting: no file named."""
    workdir = str(tmp_path)
    run_config.write(workdir, get_config("tiny"), trainer.RUN_DEFINING)
    _save_a_checkpoint(workdir)
    path = tmp_path / "config.json"
    path.write_text(path.read_text().rstrip()[:-1].rstrip() + ",\n}")  # a trailing comma
    edited = path.read_text()
    with pytest.raises(ValueError, match=re.escape(f"{path}: not JSON (Expecting property name")):
        run_config.write(workdir, get_config("tiny"), trainer.RUN_DEFINING)
    assert path.read_text() == edited


@pytest.mark.parametrize("get_trainer_config, trainer_module, key", [
    (get_config, trainer, "init.clip_text"), (get_config, trainer, "init.qformer"),
    (get_opt_config, seed_opt_trainer, "init.opt"), (get_opt_config, seed_opt_trainer, "tokenizer_export"),
    (get_opt_config, seed_opt_trainer, "tokenizer_workdir"),
    (get_decoder_config, decoder_trainer, "tokenizer_workdir")])
def test_a_rerun_may_not_change_the_weights_it_was_trained_on(tmp_path, get_trainer_config, trainer_module, key):
    """The frozen CLIP text encoder and ViT (and SEED-OPT's base OPT) are read from the
    `init` exports in training, and again from config.json by the export and the
    trainers built on the run; the decoder and SEED-OPT read their tokenizer run's. A
    rerun pointing at another was accepted, and config.json then named weights the
    checkpoints were never trained with."""
    workdir = str(tmp_path)
    run_config.write(workdir, get_trainer_config("tiny"), trainer_module.RUN_DEFINING)
    _save_a_checkpoint(workdir)
    trained = (tmp_path / "config.json").read_text()
    config = get_trainer_config("tiny")
    *sections, name = key.split(".")
    settings = config[sections[0]] if sections else config
    before = settings[name]
    settings[name] = "/ckpt/another"
    with pytest.raises(ValueError, match=re.escape(f"{key}: {before!r} -> '/ckpt/another'")):
        run_config.write(workdir, config, trainer_module.RUN_DEFINING)
    assert (tmp_path / "config.json").read_text() == trained


@pytest.mark.parametrize("get_trainer_config, trainer_module, key", [
    (get_config, trainer, "init.clip_text"), (get_config, trainer, "data.tokenizer.vocab_file"),
    (get_opt_config, seed_opt_trainer, "init.opt"), (get_opt_config, seed_opt_trainer, "tokenizer_export"),
    (get_opt_config, seed_opt_trainer, "tokenizer_workdir"), (get_opt_config, seed_opt_trainer, "text_tokenizer.folder"),
    (get_decoder_config, decoder_trainer, "tokenizer_workdir")])
def test_a_rerun_may_name_the_same_path_another_way(tmp_path, monkeypatch, get_trainer_config, trainer_module, key):
    """The SEED-OPT demo's command names its tokenizer run 'workdirs/tokenizer_demo' (from
    the repository root), the notebook '/repo/workdirs/tokenizer_demo': the notebook was
    refused the run the command had trained, as if it named another directory. Paths are
    recorded absolute, and a relative one recorded before is read from the current directory."""
    monkeypatch.chdir(tmp_path)
    workdir, config_json = str(tmp_path / "run"), tmp_path / "run" / "config.json"
    *sections, name = key.split(".")

    def write_with(value: str) -> None:
        config = get_trainer_config("tiny")
        functools.reduce(lambda c, section: c[section], sections, config)[name] = value
        run_config.write(workdir, config, trainer_module.RUN_DEFINING, trainer_module.RUN_PATHS)

    def record(value: str) -> None:  # as a config.json written before paths were recorded absolute
        settings = json.loads(config_json.read_text())
        functools.reduce(lambda c, section: c[section], sections, settings)[name] = value
        config_json.write_text(json.dumps(settings))

    same = str(tmp_path / "runs" / "a")
    write_with("./runs/a/")
    _save_a_checkpoint(workdir)
    assert weights.flatten_nested(json.loads(config_json.read_text()))[key] == same
    write_with(same)
    record("runs/a")
    write_with(same)
    with pytest.raises(ValueError, match=re.escape(f"{key}: {same!r} -> {str(tmp_path / 'runs' / 'b')!r}")):
        write_with("runs/b")
    shutil.rmtree(workdir)
    write_with("gs://bucket/runs/a")  # a URL is no local path: recorded as given
    assert weights.flatten_nested(json.loads(config_json.read_text()))[key] == "gs://bucket/runs/a"


def _parsed_as_seed_jax_main(repo_root, flags) -> dict:
    """The settings `--config=configs/seed_opt.py:seed_opt_2.7b` and `flags` give, parsed by ml_collections."""
    argv = ["main", f"--config={repo_root}/configs/seed_opt.py:seed_opt_2.7b", *flags]
    values = absl_flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    return json.loads(holder.value.to_json())


def test_a_refused_rerun_offers_flags_that_give_back_the_trained_settings(tmp_path, repo_root):
    """The refusal offered `--config.KEY={value!r}`: a tuple as `['query', 'key']`, which a
    shell splits at its spaces (and ml_collections then refuses), and a None that no flag
    parses. Its flags, taken by a shell, now give back the settings the run trained with.
    For the None it said to leave the flag out, which gives None only where the preset's
    default is None: it now says so, naming the run's preset."""
    workdir = str(tmp_path)
    trained = get_opt_config("seed_opt_2.7b")
    trained.update_from_flattened_dict({"model.dropout": None, "lora.targets": ("query", "value"),
                                        "prompts.caption": "A photo of", "seed": 3})
    run_config.write(workdir, trained, seed_opt_trainer.RUN_DEFINING)
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "image_to_text")) as manager:
        manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave({"x": np.zeros(2)})))
    config = get_opt_config("seed_opt_2.7b")
    config.update_from_flattened_dict({"model.dropout": 0.1, "lora.targets": ("query",),
                                       "prompts.caption": "An image of", "seed": 4})
    with pytest.raises(ValueError, match=r"resume with the settings it was trained with: ") as error:
        run_config.write(workdir, config, seed_opt_trainer.RUN_DEFINING)
    offered, unset = str(error.value).split("trained with: ")[1].split(" (and None for ")
    assert unset == ("--config.model.dropout, which no flag sets: leave the flag out, with a preset whose default "
                     "is None; the run's preset was 'seed_opt_2.7b')")
    parsed = weights.flatten_nested(_parsed_as_seed_jax_main(repo_root, shlex.split(offered)))
    assert parsed["lora.targets"] == ["query", "value"] and parsed["prompts.caption"] == "A photo of"
    assert parsed["seed"] == 3


def _create(config):
    return trainer.create_model(config, parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}))


def _tiny_blip2(width=32) -> Blip2Config:
    """The image side of configs/tokenizer.py:tiny as a BLIP-2 checkpoint would have it."""
    return Blip2Config(vit=ViTConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64),
                       qformer=QFormerConfig(width=width, num_layers=2, num_heads=2, mlp_dim=64, encoder_width=32,
                                             num_queries=32, causal_queries=False, vocab_size=128, max_positions=64),
                       proj_dim=16, with_itc_heads=True, with_temperature=True)


def _save(out, kind, config, module):
    weights.save(str(out), kind, config, weights.flat_params(module))
    return str(out)


def test_stage1_starts_from_a_converted_blip2_and_clip_text(tmp_path):
    blip2 = _save(tmp_path / "blip2", "blip2", _tiny_blip2(), Blip2QFormer(_tiny_blip2(), rngs=nnx.Rngs(5)))
    clip_config = CLIPTextConfig(vocab_size=128, width=16, depth=1, num_heads=2, mlp_dim=32)
    clip = _save(tmp_path / "clip", "clip_text", clip_config, CLIPTextEncoder(clip_config, rngs=nnx.Rngs(6)))
    config = get_config("tiny")
    config.init.qformer, config.init.clip_text = blip2, clip
    model = _create(config)
    ours = weights.flat_params(model.tokenizer)
    loaded = weights.load_params(blip2)
    assert "visual_encoder.patch_kernel" in loaded and "temp" in loaded and "qformer.word_embeddings" in loaded
    for name, value in loaded.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    for name, value in weights.load_params(clip).items():
        np.testing.assert_array_equal(weights.flat_params(model.clip_text)[name], value, err_msg=name)


def test_the_clip_text_encoder_alone_is_the_train_models(tmp_path):
    """`create_clip_text` (the decoder trainer's text encoder) gives the TrainModel's:
    the same random weights, or those of `init.clip_text`."""
    config = get_config("tiny")
    mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    expected = weights.flat_params(_create(config).clip_text)
    alone = weights.flat_params(trainer.create_clip_text(config, mesh))
    assert alone.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(alone[name], value, err_msg=name)
    clip_config = CLIPTextConfig(**config.clip_text.to_dict())
    config.init.clip_text = _save(tmp_path / "clip", "clip_text", clip_config,
                                  CLIPTextEncoder(clip_config, rngs=nnx.Rngs(6)))
    alone = weights.flat_params(trainer.create_clip_text(config, mesh))
    for name, value in weights.load_params(config.init.clip_text).items():
        np.testing.assert_array_equal(alone[name], value, err_msg=name)


def _recording_closes(cls, made: list):
    """`cls` (an orbax checkpointer class) whose instances are appended to `made` and marked when closed."""
    class Recording(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.closed = False
            made.append(self)

        def close(self):
            super().close()
            self.closed = True

    return Recording


def test_the_exports_orbax_checkpointers_are_closed(tmp_path, monkeypatch):
    """weights.save, stored_shapes and load_params left their orbax checkpointers open (an
    AsyncCheckpointer's metadata store holds a thread pool that orbax says must be closed), also
    when load_params refused the keys it was asked for."""
    made = []
    for name in ("Checkpointer", "StandardCheckpointer"):
        monkeypatch.setattr(ocp, name, _recording_closes(getattr(ocp, name), made))
    config = CLIPTextConfig(vocab_size=128, width=16, depth=1, num_heads=2, mlp_dim=32)
    module = CLIPTextEncoder(config, rngs=nnx.Rngs(7))
    out = str(tmp_path / "out")
    calls = {"save": lambda: _save(out, "clip_text", config, module), "stored_shapes": lambda: weights.stored_shapes(out),
             "load_params": lambda: weights.load_params(out)}
    for call, run in calls.items():
        before = len(made)
        run()
        assert len(made) > before, f"{call} made no orbax checkpointer: the recording missed it"
    params = weights.flat_params(module)
    name = next(iter(params))
    for keys, error in (({"absent": params[name]}, KeyError), ({name: np.zeros((3, 3, 3))}, ValueError)):
        with pytest.raises(error):
            weights.load_params(out, keys)
    assert [type(c).__mro__[1].__name__ for c in made if not c.closed] == []


def test_an_export_written_compressed_still_loads(tmp_path):
    """Exports are written uncompressed; those written before, with orbax's default
    zstd compression, read back the same."""
    config = CLIPTextConfig(vocab_size=128, width=16, depth=1, num_heads=2, mlp_dim=32)
    module = CLIPTextEncoder(config, rngs=nnx.Rngs(7))
    params = weights.flat_params(module)
    _save(tmp_path / "plain", "clip_text", config, module)
    compressed = tmp_path / "compressed"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(compressed / weights.PARAMS_DIR, weights._nest(params))
    checkpointer.wait_until_finished()
    shutil.copy(tmp_path / "plain" / weights.CONFIG_FILE, compressed / weights.CONFIG_FILE)
    for out in ("plain", "compressed"):
        loaded = weights.load_params(str(tmp_path / out))
        assert loaded.keys() == params.keys()
        for name, value in params.items():
            np.testing.assert_array_equal(loaded[name], value, err_msg=f"{out}: {name}")


class _Killed(Exception):
    """The process killed at this point."""


def test_an_export_killed_while_writing_its_model_json_is_written_again(tmp_path, monkeypatch):
    """model.json marks a whole export (`write_unless_current` keeps one that has it):
    written in place, a kill while writing it left a file cut short, which every later
    run failed to read (a JSONDecodeError until it was deleted by hand)."""
    config = CLIPTextConfig(vocab_size=16, max_length=4, width=8, depth=1, num_heads=1, mlp_dim=8)
    params = weights.flat_params(CLIPTextEncoder(config, rngs=nnx.Rngs(0)))
    out = str(tmp_path / "export")
    dump = json.dump

    def dump_killed_in_model_json(obj, f, **kwargs):
        if os.path.basename(f.name).startswith(weights.CONFIG_FILE):
            f.write(json.dumps(obj, **kwargs)[:20])
            raise _Killed
        dump(obj, f, **kwargs)

    def write():
        return weights.write_unless_current(out, {"s": 1}, lambda: weights.save(
            out, "clip_text", config, params, info={"steps": {"s": 1}}))

    monkeypatch.setattr(json, "dump", dump_killed_in_model_json)
    with pytest.raises(_Killed):
        write()
    monkeypatch.undo()
    assert write()
    assert weights.read_config(out)[2]["steps"] == {"s": 1}


def test_a_run_killed_between_its_export_and_done_json_writes_done_json_when_rerun(tmp_path, monkeypatch):
    """The SEED-OPT and decoder trainers' last writes: the export, then DONE.json. A rerun
    after a kill between the two found the export current, wrote nothing, and left the
    run without DONE.json for good. It now writes DONE.json (and keeps the export). A kill
    while DONE.json was being written left it empty, which the rerun kept (it exists):
    DONE.json is now written whole or not at all."""
    config = CLIPTextConfig(vocab_size=16, max_length=4, width=8, depth=1, num_heads=1, mlp_dim=8)
    params = weights.flat_params(CLIPTextEncoder(config, rngs=nnx.Rngs(0)))
    workdir, out = str(tmp_path), str(tmp_path / "export")
    saves = []

    def save():
        saves.append(out)
        weights.save(out, "clip_text", config, params, info={"steps": {"s": 1}})

    def finish():
        coordination.export_and_mark_done(workdir, out, {"s": 1}, save, done={"export": out})

    dump = json.dump

    def dump_killed_in_done_json(obj, f, **kwargs):
        if os.path.basename(f.name).startswith("DONE.json"):
            raise _Killed
        dump(obj, f, **kwargs)

    monkeypatch.setattr(json, "dump", dump_killed_in_done_json)
    with pytest.raises(_Killed):
        finish()
    monkeypatch.undo()
    finish()
    assert len(saves) == 1  # the whole export was kept
    with open(os.path.join(workdir, "DONE.json")) as f:
        assert json.load(f) == {"export": out}


def test_warm_start_errors_name_the_problem(tmp_path):
    config = get_config("tiny")
    config.init.qformer = _save(tmp_path / "wide", "blip2", _tiny_blip2(width=48),
                                Blip2QFormer(_tiny_blip2(width=48), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"qformer.query_tokens: model \(32, 32\), export \(32, 48\)"):
        _create(config)
    clip_config = CLIPTextConfig(vocab_size=128, width=16, depth=1, num_heads=2, mlp_dim=32)
    config.init.qformer = _save(tmp_path / "clip", "clip_text", clip_config,
                                CLIPTextEncoder(clip_config, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="holds a 'clip_text' export, expected one of"):
        _create(config)


def test_stage2_starts_from_a_stage1_export(trained_workdir, tmp_path):
    out = str(tmp_path / "stage1")
    restored = export(trained_workdir, out, "stage1")
    assert restored == {"stage1": 4}
    config = get_config("tiny")
    config.init.stage1 = out
    assert trainer.stages_to_run(config) == ("stage2",)
    ours = weights.flat_params(_create(config).tokenizer)
    for name, value in checkpoint_params(trained_workdir, "stage1").items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    # stage II's parameters did not come from the stage-II checkpoint
    codebook = checkpoint_params(trained_workdir, "stage2")["quantize.codebook"]
    assert not np.array_equal(np.asarray(ours["quantize.codebook"]), codebook)
    assert all(np.isfinite(np.asarray(v)).all() for v in ours.values())
    # stage II's modules start afresh, so they may be configured otherwise than in the export
    config.model.num_codes = 32
    config.model.decoder_depth = 2
    other = weights.flat_params(_create(config).tokenizer)
    assert other["quantize.codebook"].shape == (32, config.model.code_dim)
    for name, value in checkpoint_params(trained_workdir, "stage1").items():
        np.testing.assert_array_equal(other[name], value, err_msg=name)
    # a workdir that started from that export trained no stage I to export
    started = tmp_path / "from_stage1"
    shutil.copytree(f"{trained_workdir}/checkpoints/stage2", started / "checkpoints" / "stage2")
    config = get_config("tiny")
    config.init.stage1 = out
    (started / "config.json").write_text(config.to_json())
    with pytest.raises(ValueError, match="stage: 'stage1' was not trained in workdir"):
        export(str(started), str(tmp_path / "not_stage1"), "stage1")


def test_a_stage1_export_warns_when_loaded(trained_workdir, tmp_path, caplog):
    """A stage-I export loaded and encoded with its untrained codebook without a word; its
    load now warns (the jobs that read or write codes refuse it: tests/test_seed_opt.py)."""
    out = str(tmp_path / "stage1")
    export(trained_workdir, out, "stage1")
    with caplog.at_level("WARNING"):
        SeedTokenizer.load(out)
    assert re.search(r"trained through stage I only \(steps \{'stage1': 4\}\): its codebook", caplog.text)


def test_a_sharded_model_exports_and_reads_back_to_host_numpy(tmp_path, recwarn):
    model = trainer.create_model(get_config("tiny"), parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}))
    params = weights.flat_params(model.tokenizer)
    assert any(len(v.sharding.device_set) > 1 for v in params.values()), "nothing is sharded"
    weights.save(str(tmp_path / "out"), "seed_tokenizer", model.tokenizer.config, params)
    loaded = weights.load_params(str(tmp_path / "out"))
    assert set(loaded) == set(params)
    for name, value in loaded.items():
        assert isinstance(value, np.ndarray) and value.dtype == np.float32, name
        np.testing.assert_array_equal(value, np.asarray(params[name]), err_msg=name)
    assert not [w for w in recwarn if "Sharding info" in str(w.message)]

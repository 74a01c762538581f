"""configs/tokenizer.py presets and their model configs."""

import os
import subprocess
import sys

import pytest

from configs.tokenizer import get_config
from seed_jax.models.tokenizer import SeedTokenizerConfig


def test_default_preset_is_demo_on_cpu():
    c = get_config()
    assert c.preset == "demo" and c.data.source == "synthetic"
    assert dict(c.mesh) == {"data": -1, "fsdp": 1, "tensor": 1}
    assert c.data.synthetic.num_eval >= 1000 and c.eval.num_examples >= 1000


def test_seed1_matches_the_paper_recipe():
    c = get_config("seed1,gpu8x8")
    m = SeedTokenizerConfig.from_dict(c.model.to_dict())
    assert (m.vit.width, m.vit.depth, m.vit.image_size, m.vit.patch_size) == (1408, 39, 224, 14)
    assert (m.qformer.width, m.qformer.num_layers, m.qformer.num_queries, m.qformer.causal_queries) == (
        768, 12, 32, True)
    assert (m.reverse_qformer.num_layers, m.reverse_qformer.num_queries, m.reverse_qformer.causal_queries) == (
        4, 77, False)
    assert (m.num_codes, m.code_dim, m.decoder_depth) == (8192, 32, 4)
    assert (c.stage1.lr, c.stage1.init_lr, c.stage1.end_lr, c.stage1.warmup_steps) == (3e-5, 3e-7, 3e-6, 2000)
    assert (c.stage2.lr, c.stage2.init_lr, c.stage2.end_lr) == (1e-4, 1e-6, 1e-5)
    assert c.stage1.weight_decay == c.stage2.weight_decay == 0.05
    assert "visual_encoder" not in c.stage1.trainable and "qformer" not in c.stage2.trainable
    assert c.data.crop_scale == (0.5, 1.0) and c.data.flip and c.data.max_text_length == 32
    assert (c.loss_weights.vq, c.loss_weights.recon, c.loss_weights.distill) == (5.0, 2.0, 0.5)
    assert dict(c.mesh) == {"data": 8, "fsdp": 8, "tensor": 1}


def test_seed1_trains_at_seeds_global_batches():
    """SEED's scripts ran 8 nodes x 8 GPUs at 64 (stage I) and 256 (stage II) rows per GPU."""
    from seed_jax.trainers.tokenizer import stage_batch_size

    c = get_config("seed1,gpu8x8")
    assert (stage_batch_size(c, "stage1"), stage_batch_size(c, "stage2")) == (64 * 64, 64 * 256)
    assert (c.stage1.steps_per_epoch, c.stage1.num_epochs, c.stage1.num_steps) == (5000, 10, 50_000)
    assert (c.stage2.steps_per_epoch, c.stage2.num_epochs) == (5000, 500)


def test_seed1_cleans_captions_as_lavis_and_the_demos_do_not():
    """seed1 runs every caption through LAVIS's blip_caption, as SEED's training did; the
    demo and tiny presets keep their captions as written (their figures were measured so)."""
    assert get_config("seed1").data.caption_processor == "blip_caption"
    assert get_config("demo").data.caption_processor == get_config("tiny").data.caption_processor == "none"


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="bogus"):
        get_config("demo,bogus")


def test_a_preset_given_to_pretokenize_is_named():
    """configs/pretokenize.py has no presets: `:gpu8`, as the other configs take, was ignored."""
    from configs.pretokenize import get_config as pretokenize_config

    assert pretokenize_config().preset == "default"
    with pytest.raises(ValueError, match="'gpu8': configs/pretokenize.py has no presets"):
        pretokenize_config("gpu8")


def test_config_files_load_by_path_and_name_a_missing_one(repo_root, tmp_path):
    from seed_jax import config_files

    config = config_files.load(f"{repo_root}/configs/seed_opt.py", "tiny")
    assert config.preset == "tiny" and config.tokenizer.preset == "tiny"  # its tokenizer config, loaded as a sibling
    with pytest.raises(FileNotFoundError, match="nope.py"):
        config_files.load(str(tmp_path / "nope.py"))


@pytest.mark.parametrize("module, flags", [
    ("seed_jax.main", ["--config={repo_root}/configs/tokenizer.py:tiny"]),
    ("seed_jax.export", []),
    ("seed_jax.evaluators.caption_codes", ["--export=E", "--codes_dir=C"]),
    ("seed_jax.evaluators.caption_swaps", ["--tokenizer_workdir=T"]),
    ("seed_jax.evaluators.feature_probe", ["--tokenizer_workdir=T"]),
    ("seed_jax.evaluators.query_redundancy", ["--export=E", "--data_dir=D"]),
    ("seed_jax.evaluators.vit_from_labels", ["--tokenizer_workdir=T"])])
def test_a_stray_argument_is_refused_naming_it(module, flags, repo_root, tmp_path):
    """`python -m seed_jax.main --config=... workdirs/mine` dropped the path and trained
    into the default workdir; every command line now refuses arguments that are not flags."""
    flags = [flag.format(repo_root=repo_root) for flag in flags]
    result = subprocess.run([sys.executable, "-m", module, *flags, "workdirs/mine"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": repo_root}, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "unexpected arguments ['workdirs/mine']: every setting is a flag" in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--config=configs/nope.py"], "flag --config=configs/nope.py: config file 'configs/nope.py' does not exist"),
    (["--config=configs/nope.py:tiny", "--config.stage1.num_steps=5"],
     "flag --config=configs/nope.py:tiny: config file 'configs/nope.py' does not exist"),
    (["--config=configs/tokenizer.py:tiny", "--config.stage1.num_step=5"],
     "flag --config.stage1.num_step=5: no config field stage1.num_step; did you mean stage1.num_steps"),
    (["--config=configs/tokenizer.py:tiny", "--config.seed.x=1"],
     "flag --config.seed.x=1: no config field seed.x: seed is 0, not a group of fields"),
    (["--config", "configs/seed_opt.py:tiny", "--config.tokenizer.stagee1.num_steps=5"],
     "flag --config.tokenizer.stagee1.num_steps=5: no config field tokenizer.stagee1; did you mean tokenizer.stage1"),
    (["--config=configs/decoder.py:tiny", "--config.zzz=1"], "flag --config.zzz=1: no config field zzz; the config has "
                                                             "axis_rules, checkpoint_every_steps, data, dtype, eval,"),
    # an unknown preset was ml_collections' traceback of the config file's ValueError
    (["--config=configs/tokenizer.py:Seed1,gpu8"], "flag --config=configs/tokenizer.py:Seed1,gpu8: config arg "
                                                   "'Seed1,gpu8': expected one of ('demo', 'seed1', 'tiny')"),
    (["--config=configs/decoder.py:tiny,cpu", "--config=configs/decoder.py:tiny"],
     "flag --config=configs/decoder.py:tiny,cpu: config arg 'tiny,cpu': expected one of ('demo', 'tiny')")])
def test_a_missing_config_file_or_field_fails_naming_the_flag(flags, message, repo_root, tmp_path):
    """A misspelt override ended in ml_collections' 55-line traceback and a missing
    config file in a 30-line one, the cause in their middle; each is now a flag error,
    as absl reports a value of the wrong type, with the fields nearest a misspelt one."""
    result = subprocess.run([sys.executable, "-m", "seed_jax.main", *flags, f"--workdir={tmp_path}/w"],
                            cwd=repo_root, env={**os.environ, "PYTHONPATH": repo_root}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert f"FATAL Flags parsing error: {message}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("flags, in_file, message", [
    (["{flagfile}"], ["--config=configs/tokenizer.py:tiny", "--config.stage1.num_step=5"],
     "flag --config.stage1.num_step=5: no config field stage1.num_step; did you mean stage1.num_steps"),
    (["{flagfile}"], ["--config=configs/nope.py"],
     "flag --config=configs/nope.py: config file 'configs/nope.py' does not exist"),
    (["--config=configs/tokenizer.py:tiny", "{flagfile}"], ["--config.stage1.num_step=5"],
     "flag --config.stage1.num_step=5: no config field stage1.num_step; did you mean stage1.num_steps"),
    (["{flagfile}", "--config=configs/tokenizer.py:tiny"], ["--config=configs/nope.py"],
     "flag --config=configs/nope.py: config file 'configs/nope.py' does not exist")])
def test_a_missing_config_file_or_field_in_a_flagfile_fails_naming_the_flag(flags, in_file, message, repo_root,
                                                                              tmp_path):
    """Flags read from a --flagfile were not looked at: a misspelt override or a missing
    config file there ended in ml_collections' traceback, as did a missing config file
    before the --config absl takes (ml_collections fails on it too)."""
    flagfile = tmp_path / "flags.txt"
    flagfile.write_text("\n".join(in_file) + "\n")
    flags = [flag.format(flagfile=f"--flagfile={flagfile}") for flag in flags]
    result = subprocess.run([sys.executable, "-m", "seed_jax.main", *flags, f"--workdir={tmp_path}/w"], cwd=repo_root,
                            env={**os.environ, "PYTHONPATH": repo_root}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert f"FATAL Flags parsing error: {message}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("flags, in_file", [
    (["--config=configs/tokenizer.py:tiny", "--config", "configs/pretokenize.py"], []),
    (["{flagfile}", "--config=configs/pretokenize.py"], ["--config=configs/tokenizer.py:tiny"])])
def test_a_later_config_replaces_an_earlier_one_with_its_overrides(flags, in_file, repo_root, tmp_path):
    """absl takes the last --config (launch/local_multiprocess.sh gives its own before the
    caller's flags), but ml_collections applied every override to each config it loaded: one
    of a field the earlier config lacks (pretokenize's splits.train.dir after the tokenizer's)
    ended in its KeyError traceback. The run now starts on the last config, with the override."""
    flagfile = tmp_path / "flags.txt"
    flagfile.write_text("\n".join(in_file) + "\n")
    flags = [flag.format(flagfile=f"--flagfile={flagfile}") for flag in flags]
    result = subprocess.run([sys.executable, "-m", "seed_jax.main", *flags, f"--config.splits.train.dir={tmp_path}/no",
                             f"--config.tokenizer_export={tmp_path}/export", f"--workdir={tmp_path}/w"],
                            cwd=repo_root, env={**os.environ, "PYTHONPATH": repo_root}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"FATAL config error: config.splits.train.dir: no ArrayRecord shards named 'train-*-of-*.array_record' " \
           f"in '{tmp_path}/no': no such folder" in result.stderr, result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--config=configs/tokenizer.py:tiny", "--config.itc_gradient=local"],
     "FATAL config error: itc_gradient: expected one of ('global', 'lavis'), got 'local'"),
    (["--config=configs/decoder.py:tiny", "--config.uncond_probability=2"],
     "FATAL config error: uncond_probability: expected a probability in [0, 1], got 2.0"),
    (["--config=configs/seed_opt.py:tiny", "--config.image_embedding=pixels"],
     "FATAL config error: image_embedding: expected 'rows' or 'codebook_projection', got 'pixels'"),
    (["--config=configs/pretokenize.py"],
     "FATAL config error: config.tokenizer_export: the SEED tokenizer export to encode with is required"),
    (["--config=configs/tokenizer.py:tiny", "--config.trainer=bogus"],
     "config.trainer: expected one of ['decoder', 'pretokenize', 'seed_opt', 'tokenizer'], got 'bogus'"),
    # the decoder's trainer ran on the tokenizer's config: an AttributeError's traceback
    (["--config=configs/tokenizer.py:tiny", "--config.trainer=decoder"],
     "config.trainer: configs/tokenizer.py configures the 'tokenizer' trainer, got 'decoder': give the 'decoder' "
     "trainer's config file instead (--config=configs/FILE.py)")])
def test_a_setting_a_run_cannot_start_with_fails_with_its_message_alone(flags, message, repo_root, tmp_path):
    """Each trainer's checks of its settings named the field and what it expects, at the
    end of a traceback through main and the trainer; the message is now all there is."""
    result = subprocess.run([sys.executable, "-m", "seed_jax.main", *flags, f"--workdir={tmp_path}"], cwd=repo_root,
                            env={**os.environ, "PYTHONPATH": repo_root}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.rstrip().endswith(message), result.stderr
    assert "Traceback" not in result.stderr


def test_a_config_file_whose_get_config_needs_its_argument_starts(repo_root, tmp_path):
    """The check that config.trainer is the config file's called `get_config()` without
    the argument after the colon: a user's file whose get_config needs one failed in a
    TypeError traceback before any setting was looked at."""
    own = tmp_path / "my_config.py"
    own.write_text("from configs import tokenizer\n\n\ndef get_config(preset):\n"
                   "    return tokenizer.get_config(preset)\n")
    result = subprocess.run([sys.executable, "-m", "seed_jax.main", f"--config={own}:tiny",
                             "--config.itc_gradient=local", f"--workdir={tmp_path}/w"], cwd=repo_root,
                            env={**os.environ, "PYTHONPATH": repo_root}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.rstrip().endswith("FATAL config error: itc_gradient: expected one of ('global', 'lavis'), "
                                           "got 'local'"), result.stderr


def test_verbosity_1_shows_where_a_config_error_was_raised(repo_root, tmp_path):
    """The message alone hid the traceback of a ValueError that a bug inside the checks
    raises; `--verbosity=1` now logs it before the message."""
    result = subprocess.run([sys.executable, "-m", "seed_jax.main", "--config=configs/tokenizer.py:tiny",
                             "--config.itc_gradient=local", "--verbosity=1", f"--workdir={tmp_path}"], cwd=repo_root,
                            env={**os.environ, "PYTHONPATH": repo_root}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.rstrip().endswith(
        "FATAL config error: itc_gradient: expected one of ('global', 'lavis'), got 'local'"), result.stderr
    assert "Traceback" in result.stderr and "ValueError: itc_gradient" in result.stderr, result.stderr


@pytest.mark.parametrize("workdir, message", [
    ("{tmp}/file", "--workdir={tmp}/file: {tmp}/file is a file, not a directory"),
    ("{tmp}/file/run", "--workdir={tmp}/file/run: {tmp}/file is a file, not a directory"),
    ("", "--workdir is empty: give a directory, or leave the flag out for the default ./workdirs/<trainer>_<preset>")])
def test_a_workdir_that_cannot_be_one_is_a_usage_error(workdir, message, repo_root, tmp_path):
    """A file at (or above) --workdir failed in os.makedirs with a traceback, and an empty
    --workdir (`--workdir=$DIR`, DIR unset) trained into ./workdirs/<trainer>_<preset>."""
    (tmp_path / "file").write_text("")
    result = subprocess.run([sys.executable, "-m", "seed_jax.main", f"--config={repo_root}/configs/tokenizer.py:tiny",
                             f"--workdir={workdir.format(tmp=tmp_path)}"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": repo_root}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.rstrip().endswith(message.format(tmp=tmp_path)), result.stderr
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_a_home_directory_path_is_expanded_in_workdir_and_settings(repo_root, tmp_path):
    """`--workdir=~/w` trained into ./~/w and `--config.*dir=~/x` read ./~/x (a shell
    leaves a `~` after `=` as it is); both now name the home directory's."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    (home / "data").mkdir(parents=True)
    cwd.mkdir()
    result = subprocess.run([sys.executable, "-m", "seed_jax.main", f"--config={repo_root}/configs/pretokenize.py",
                             "--workdir=~/w", "--config.tokenizer_export=~/export", "--config.splits.train.dir=~/data"],
                            cwd=cwd,
                            env={**os.environ, "PYTHONPATH": repo_root, "HOME": str(home)}, capture_output=True,
                            text=True, timeout=300)
    assert f"workdir: {home}/w\n" in result.stdout, result.stdout
    assert result.stderr.rstrip().endswith("FATAL config error: config.splits.train.dir: no ArrayRecord shards named "
                                           f"'train-*-of-*.array_record' in '{home}/data'"), result.stderr
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert os.listdir(cwd) == []


def test_export_takes_workdir_and_out_under_the_home_directory(repo_root, tmp_path):
    """`python -m seed_jax.export --workdir=~/w --out=~/e` looked for ./~/w; `~` is now the
    home directory. A folder it cannot export (no config.json) is refused with that message
    alone, not at the end of a traceback."""
    (tmp_path / "w").mkdir()
    result = subprocess.run([sys.executable, "-m", "seed_jax.export", "--workdir=~/w", "--out=~/e"], cwd=repo_root,
                            env={**os.environ, "PYTHONPATH": repo_root, "HOME": str(tmp_path)}, capture_output=True,
                            text=True, timeout=300)
    assert result.stderr.rstrip().endswith(f"FATAL export error: workdir {tmp_path}/w: no config.json (is it a "
                                           "training workdir?)"), result.stderr
    assert result.returncode == 1 and "Traceback" not in result.stderr


def test_help_names_every_config_with_its_presets_and_layouts(repo_root):
    """`--help` named configs/tokenizer.py alone, with `[:preset]`: no other config, preset,
    layout or `--config.KEY=VALUE` override."""
    from configs import decoder, seed_opt, tokenizer

    result = subprocess.run([sys.executable, "-m", "seed_jax.main", "--help"], cwd=repo_root,
                            env={**os.environ, "PYTHONPATH": repo_root}, capture_output=True, text=True, timeout=300)
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  configs/")}
    presets = {"tokenizer": tokenizer.MODEL_PRESETS, "decoder": decoder.PRESETS, "seed_opt": seed_opt.MODEL_PRESETS,
               "pretokenize": ()}
    assert sorted(lines) == sorted(f"configs/{name}.py" for name in presets)
    for name, names in presets.items():
        assert all(f" {preset}" in lines[f"configs/{name}.py"] for preset in names), (name, names)
    layouts = next(line for line in result.stdout.splitlines() if line.strip().startswith("LAYOUT"))
    assert set(tokenizer.LAYOUT_PRESETS) == set(seed_opt.LAYOUT_PRESETS)
    assert all(f" {layout}" in layouts for layout in tokenizer.LAYOUT_PRESETS)
    assert "--config.KEY=VALUE" in result.stdout

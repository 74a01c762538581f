"""The notebooks in notebooks/ run top to bottom at the `tiny` preset, in a Jupyter
kernel, with their parameter cell overridden the way papermill does it."""

import json
import os
import re
import shlex
import shutil

import nbformat
from nbclient import NotebookClient

from conftest import REPO
from helpers import decoder_with_text_encoder_changed

NOTEBOOKS = os.path.join(REPO, "notebooks")


def execute(name: str, parameters: dict) -> nbformat.NotebookNode:
    """Runs notebooks/`name` with `parameters` assigned after its "parameters" cell;
    returns the executed notebook (a failing cell raises, naming it)."""
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters', found {len(tagged)}"
    source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    run(notebook)
    return notebook


def run(notebook: nbformat.NotebookNode, cwd: str = NOTEBOOKS) -> None:
    """Executes `notebook` in a Jupyter kernel started in `cwd`, which imports seed_jax
    from this checkout: a relative PYTHONPATH (the usual '.') named notebooks/ there, and
    the kernel fell back on whichever seed_jax was installed (another checkout's)."""
    given = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO] + given))
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": cwd}}).execute(env=env)


def outputs(notebook: nbformat.NotebookNode) -> tuple[str, int]:
    """(all printed text, number of images displayed)."""
    text, images = [], 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            text.append(output.get("text", ""))
            images += "image/png" in output.get("data", {})
    return "".join(text), images


def test_notebooks_have_no_stored_outputs():
    for name in sorted(os.listdir(NOTEBOOKS)):
        notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
        nbformat.validate(notebook)
        assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), name


def test_the_kernel_imports_this_checkouts_seed_jax():
    """The notebooks under test are this checkout's, and so must be the code they run."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import seed_jax\nprint(seed_jax.__file__)")])
    run(notebook)
    assert outputs(notebook)[0].strip() == os.path.join(REPO, "seed_jax", "__init__.py")


def test_a_kernel_in_another_directory_finds_the_checkout(tmp_path):
    """REPO was the kernel's working directory unless that was notebooks/: a kernel started
    elsewhere (papermill run from another directory) looked for configs/ there and failed
    ("config file '.../configs/tokenizer.py' does not exist"). It is now the checkout seed_jax
    is imported from."""
    for name in sorted(os.listdir(NOTEBOOKS)):
        notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
        parameters = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
        notebook.cells = [*parameters, nbformat.v4.new_code_cell("print(REPO)")]
        run(notebook, cwd=str(tmp_path))
        assert outputs(notebook)[0].strip() == REPO, name


def test_the_workdirs_follow_the_preset_set_in_the_parameter_cell():
    """They were the demo's whatever PRESET: a notebook set to `tiny` trained into
    workdirs/tokenizer_demo, which the command line's demos then reused or refused. They are
    now workdirs/<trainer>_<preset>, as the command line's defaults."""
    for name in sorted(os.listdir(NOTEBOOKS)):
        notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
        cell, = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
        assert cell.source.count('PRESET = "demo"') == 1, name
        cell.source = cell.source.replace('PRESET = "demo"', 'PRESET = "tiny"')
        printed = "import json\nprint(json.dumps({k: v for k, v in dict(globals()).items() if k.endswith('WORKDIR')}))"
        notebook.cells = [cell, nbformat.v4.new_code_cell(printed)]
        run(notebook)
        workdirs = json.loads(outputs(notebook)[0])
        assert workdirs and all(os.path.basename(w).endswith("_tiny") for w in workdirs.values()), (name, workdirs)


def test_colab_set_up_installs_the_clone_so_that_it_imports_at_once():
    """The Colab set-up said `pip install -e`: an editable install is importable only after
    the runtime restarts, and until then `import seed_jax` found the clone's folder in
    /content (a namespace package), so `from seed_jax import config_files` failed. The
    clone is installed as a package instead, from where REPO is told to point."""
    for name in sorted(os.listdir(NOTEBOOKS)):
        notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
        setup = [cell.source for cell in notebook.cells if cell.cell_type == "markdown" and "In Colab" in cell.source]
        assert len(setup) == 1, f"{name}: expected one markdown cell with the Colab set-up"
        clone = re.search(r'`REPO = "([^"]+)"`', setup[0]).group(1)
        commands = [shlex.split(command) for command in re.findall(r"`!([^`]*)`", setup[0])]
        installs = [words[words.index("install") + 1:] for words in commands if "install" in words]
        assert installs, f"{name}: no pip install in {setup[0]!r}"
        for arguments in installs:
            assert not {"-e", "--editable"} & set(arguments), f"{name}: {arguments}"
            assert clone in arguments, f"{name}: {arguments} does not install the clone at {clone}"


def test_tokenizer_notebook_exports_encodes_and_retrieves(tiny_decoder_run, tmp_path):
    """On a copy of the session's finished tiny tokenizer run whose export is marked as
    trained fewer steps (as after a resume with more steps): the training cell resumes
    the run at its end (training itself: test_train.py), the rest exports it again
    (the stale export was once loaded as it was), loads it and reads held-out images."""
    workdir = str(tmp_path / "tokenizer")
    shutil.copytree(os.path.join(tiny_decoder_run, "tokenizer"), workdir)
    model_json = os.path.join(workdir, "export", "model.json")
    with open(model_json) as f:
        meta = json.load(f)
    trained = dict(meta["info"]["steps"])
    meta["info"]["steps"] = {**trained, "stage2": trained["stage2"] - 1}
    with open(model_json, "w") as f:
        json.dump(meta, f)
    # one image shown: matplotlib's subplots then returns a bare Axes unless told not to squeeze
    notebook = execute("tokenizer_demo.ipynb", dict(PRESET="tiny", WORKDIR=workdir, NUM_SHOWN=1, NUM_RETRIEVAL=32))
    text, images = outputs(notebook)
    assert images == 2  # the training curves and the image with its codes
    assert "stage2 {'retrieval/i2t_r1'" in text and "generation embeddings: (1, 77, 16)" in text
    assert text.count("found: ") == 1
    with open(model_json) as f:
        assert json.load(f)["info"]["steps"] == trained  # written again from the run's checkpoints


def test_seed_opt_notebook_trains_captions_writes_codes_and_paints(tiny_decoder_run, tmp_path):
    """The first run trains SEED-OPT and paints with the decoder of its tokenizer run. The
    others find SEED-OPT trained, and their tokenizer run named another way (absolute, as
    the notebook names it, where the first named it relative, as the demo's command does:
    the run was refused as trained on another tokenizer). Without a decoder they write codes
    only, and so with a decoder trained for another tokenizer run (another CLIP text
    encoder), with which they painted images unrelated to the codes."""
    tokenizer_workdir = str(tmp_path / "tokenizer")  # a copy, so the shared run stays untouched
    shutil.copytree(os.path.join(tiny_decoder_run, "tokenizer"), tokenizer_workdir)
    another_runs_decoder = str(tmp_path / "another_runs_decoder")
    decoder_with_text_encoder_changed(os.path.join(tiny_decoder_run, "export"),
                                      os.path.join(another_runs_decoder, "export"),
                                      lambda text_encoder: {k: v + 1.0 for k, v in text_encoder.items()})
    workdir = str(tmp_path / "seed_opt")
    parameters = dict(PRESET="tiny", WORKDIR=workdir, DECODE_STEPS=2)
    # one image shown: matplotlib's subplots then squeezes its grid unless told not to
    runs = ((os.path.relpath(tokenizer_workdir, NOTEBOOKS), tiny_decoder_run, 3, 1),  # relative to the kernel's cwd
            (tokenizer_workdir, str(tmp_path / "no_decoder"), 2, 3),
            (tokenizer_workdir, another_runs_decoder, 2, 2))
    for tokenizer_dir, decoder_workdir, num_images, shown in runs:
        text, images = outputs(execute("seed_opt_demo.ipynb", dict(
            parameters, TOKENIZER_WORKDIR=tokenizer_dir, DECODER_WORKDIR=decoder_workdir, NUM_SHOWN=shown)))
        assert images == num_images  # loss curves, held-out images (and painted ones)
        assert "both_directions {'caption/exact_match'" in text
        assert "'caption/exact_match'" in text.split("generated:")[-1] and text.count("prompt: ") == shown
        assert ("| decoder: none (codes only)" in text) == (num_images == 2)
    assert os.path.exists(os.path.join(workdir, "export", "model.json"))

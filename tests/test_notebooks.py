"""The notebooks run top to bottom in a real Jupyter kernel: train_digits.ipynb on a shrunken digits run, then
sample.ipynb on the checkpoint it wrote, and on official-format weights it downloads from a server on
127.0.0.1. Parameters go in as papermill does: a cell after the one tagged `parameters`. The Colab install
cell runs in fresh virtual environments against a `git clone` of this repository."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from flowar_jax.convert.fetch import PUBLISHED
from loopback import FileServer

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))

# The digits config shrunk to seconds of training (the notebook's structure is what is tested here).
TINY_RUN = {
    "num_train_steps": 6, "vae.train.num_train_steps": 6, "checkpoint_every_steps": 6, "log_every_steps": 2,
    "sample_every_steps": 6, "batch_size": 16, "vae.train.batch_size": 16, "model.width": 64,
    "model.depth": 1, "model.head.depth": 1, "model.head.width": 64, "data.cache_latents": False,
    "vae.latent_scale": 1.0, "sampling.num_samples": 10, "sampling.batch_size": 10, "sampling.num_steps": 2,
}


def _execute(name: str, parameters: dict, cwd: str):
  """Runs notebooks/NAME with `parameters` injected after its parameters cell; returns the executed notebook."""
  notebook = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  (index,) = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
  source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
  client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": cwd}})
  client.execute()
  return notebook


def _outputs(notebook, kind: str) -> list:
  return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
          if kind in out.get("data", {})]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebooks_are_committed_clean(path):
  """Outputs cleared, parameters in one tagged cell, the package imported rather than copied."""
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
  assert sum("parameters" in cell.metadata.get("tags", []) for cell in code) == 1
  assert any("from flowar_jax" in cell.source for cell in code)
  assert not any(line.lstrip().startswith(("def ", "class ")) for cell in code for line in cell.source.splitlines())
  setup = code[0].source  # the Colab install cell does nothing where flowar_jax is importable
  assert "find_spec('flowar_jax') is None" in setup
  assert setup == _install_cell()  # the same in every notebook, so test_install_cell_in_fresh_venvs covers all


def test_notebooks_run_top_to_bottom(tmp_path, monkeypatch):
  # The kernels share compiled programs where they match (the sampler of both notebooks at cfg 3, batch 10).
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
  workdir = str(tmp_path / "run")
  train = _execute("train_digits.ipynb", {"WORKDIR": workdir, "OVERRIDES": TINY_RUN}, str(tmp_path))
  assert len(_outputs(train, "image/png")) == 4  # the data, reconstructions, the loss plot, samples
  text = "".join(out.get("text", "") for cell in train.cells if cell.cell_type == "code" for out in cell.outputs)
  assert "digit classifier on the samples: accuracy" in text and "tokens/s" in text
  assert os.path.exists(os.path.join(workdir, "samples", "grid.png"))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if "samples" in r] == [6]  # the grid written during training

  sample = _execute("sample.ipynb", {"WORKDIR": workdir, "NUM_STEPS": 2, "PER_CLASS": 1, "CFG": 3.0,
                                     "CLASSES": "", "EDITS": 2}, str(tmp_path))
  grids = _outputs(sample, "image/png")
  assert len(grids) == 3  # the class grid, the guidance comparison and the edits
  for row in ("row 1: the right half, own class (class 0)", "row 2: the right half, another class (class 1)",
              "row 3: outpainting (class 0): input, mask, 2 edits"):
    assert row in _text(sample), row
  assert "already holds a checkpoint" in _text(sample)


# digits.py shrunk, with the official VAE layout (the decoder has one block more than the encoder).
OFFICIAL_TINY = {"model.width": 32, "model.depth": 1, "model.head.depth": 1, "model.head.width": 32,
                 "model.head.head_dim": 16, "vae.decoder_blocks": 2, "vae.base_channels": 8, "vae.norm_groups": 4}


def _text(notebook) -> str:
  return "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)


def test_sample_notebook_converts_official_weights_by_url(tmp_path, monkeypatch):
  """OFFICIAL_CHECKPOINT and OFFICIAL_VAE as URLs: downloaded (once), converted, sampled."""
  from flowar_jax.config_files import load_config  # pylint: disable=g-import-not-at-top
  from test_convert import official_flowar_state_dict, official_vae_state_dict  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  config = load_config(os.path.join(ROOT, "configs", "digits.py"), OFFICIAL_TINY)
  files = {}
  for name, state_dict in (("FlowAR-T.npz", official_flowar_state_dict(config)[1]),
                           ("kl16.npz", official_vae_state_dict(config)[1])):
    np.savez(tmp_path / name, **state_dict)
    files["/weights/" + name] = (tmp_path / name).read_bytes()
  with FileServer().running() as server:
    server.files.update(files)
    parameters = {"WORKDIR": str(tmp_path / "official"), "PRESET": "digits", "OVERRIDES": OFFICIAL_TINY,
                  "OFFICIAL_CHECKPOINT": server.url + "/weights/FlowAR-T.npz",
                  "OFFICIAL_VAE": server.url + "/weights/kl16.npz", "NUM_STEPS": 2, "CFG": 3.0,
                  "CLASSES": "1,7", "PER_CLASS": 1, "EDITS": 1}
    notebook = _execute("sample.ipynb", parameters, str(tmp_path))
    assert [server.count(path) for path in files] == [1, 1]
  assert len(_outputs(notebook, "image/png")) == 3
  assert "row 2: the right half, another class (class 7)" in _text(notebook)
  assert "converted the 'state dict' weights of http://127.0.0.1:" in _text(notebook)
  assert len(os.listdir(tmp_path / "xdg" / "flowar_jax" / "downloads")) == 2


def test_sample_notebook_samples_var_from_converted_weights(tmp_path, monkeypatch):
  """PRESET var_digits with official-format VAR and VQVAE state dicts (random weights) by URL: converted into the
  workdir, sampled, the guidance rows compared at cfg 0; the editing cell says it edits FlowAR runs."""
  from flowar_jax.config_files import load_config  # pylint: disable=g-import-not-at-top
  from flowar_jax.convert.var import var_state_dict, vqvae_state_dict  # pylint: disable=g-import-not-at-top
  from flowar_jax.models.registry import build_model, build_vae  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  config = load_config(os.path.join(ROOT, "configs", "var_digits.py"))
  files = {}
  for name, state_dict in (("var_tiny.npz", var_state_dict(build_model(config, 1))),
                           ("vq_tiny.npz", vqvae_state_dict(build_vae(config, 2)))):
    np.savez(tmp_path / name, **state_dict)
    files["/weights/" + name] = (tmp_path / name).read_bytes()
  with FileServer().running() as server:
    server.files.update(files)
    parameters = {"WORKDIR": str(tmp_path / "var"), "PRESET": "var_digits", "OVERRIDES": {},
                  "OFFICIAL_CHECKPOINT": server.url + "/weights/var_tiny.npz",
                  "OFFICIAL_VAE": server.url + "/weights/vq_tiny.npz", "CFG": 2.0, "CLASSES": "1,7",
                  "PER_CLASS": 2, "EDITS": 1}
    notebook = _execute("sample.ipynb", parameters, str(tmp_path))
    assert [server.count(path) for path in files] == [1, 1]
  assert len(_outputs(notebook, "image/png")) == 2  # the class grid and the guidance comparison
  text = _text(notebook)
  assert "var, 10 classes, 16px images; sampling CategoricalSampling(cfg=2.0" in text
  assert "editing: the edit library edits FlowAR runs; this run is var" in text


def test_sample_notebook_samples_a_hart_run(tmp_path, monkeypatch):
  """PRESET hart_digits over a workdir holding a (random-weight) HART checkpoint and its hybrid tokenizer:
  sampled with the residual head's step count from NUM_STEPS, the guidance rows compared at cfg 0; without a
  checkpoint the notebook says to train one (HART has no official class-conditional weights)."""
  from flowar_jax.config_files import load_config  # pylint: disable=g-import-not-at-top
  from flowar_jax.models.params import split_params  # pylint: disable=g-import-not-at-top
  from flowar_jax.models.registry import build_model, build_tokenizer_trainable  # pylint: disable=g-import-not-at-top
  from flowar_jax.runs.checkpointing import Checkpointer  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
  config = load_config(os.path.join(ROOT, "configs", "hart_digits.py"),
                       {"model.width": 64, "model.residual.width": 32, "vae.vocab_size": 32})
  workdir = tmp_path / "hart"
  for directory, module in ((workdir / "checkpoints", build_model(config, 1)),
                            (workdir / "vae" / "checkpoints", build_tokenizer_trainable(config, 2))):
    _, params = split_params(module)
    with Checkpointer(str(directory), keep=None, async_save=False) as checkpointer:
      checkpointer.save(0, {"step": np.asarray(0, np.int32), "params": params, "ema_params": params}, config=config)
  parameters = {"WORKDIR": str(workdir), "PRESET": "hart_digits", "OVERRIDES": {}, "OFFICIAL_CHECKPOINT": "",
                "OFFICIAL_VAE": "", "CFG": 2.0, "NUM_STEPS": 3, "CLASSES": "1,7", "PER_CLASS": 2, "EDITS": 1}
  notebook = _execute("sample.ipynb", parameters, str(tmp_path))
  assert len(_outputs(notebook, "image/png")) == 2  # the class grid and the guidance comparison
  text = _text(notebook)
  assert "hart, 10 classes, 16px images; sampling HARTSampling(categorical=CategoricalSampling(cfg=2.0" in text
  assert "residual_steps=3" in text
  assert "editing: the edit library edits FlowAR runs; this run is hart" in text
  empty = dict(parameters, WORKDIR=str(tmp_path / "untrained"))
  with pytest.raises(nbclient.exceptions.CellExecutionError, match="HART has no official class-conditional weights"):
    _execute("sample.ipynb", empty, str(tmp_path))


def test_sample_notebook_prefills_the_published_files():
  notebook = nbformat.read(os.path.join(ROOT, "notebooks", "sample.ipynb"), as_version=4)
  (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
  values = {}
  exec(cell.source, {}, values)  # pylint: disable=exec-used  # plain assignments
  assert (values["PRESET"], values["OFFICIAL_CHECKPOINT"]) == ("flowar_s", PUBLISHED["flowar_s"])
  assert values["OFFICIAL_VAE"] == PUBLISHED["kl16"]
  with open(os.path.join(ROOT, "docs", "convert.md")) as f:
    docs = f.read()
  assert all(source in docs for source in PUBLISHED.values())


def _install_cell() -> str:
  notebook = nbformat.read(os.path.join(ROOT, "notebooks", "sample.ipynb"), as_version=4)
  return [cell for cell in notebook.cells if cell.cell_type == "code"][0].source


def _fresh_venv(path) -> str:
  """A virtual environment without flowar_jax that sees this environment's other packages (a .pth file lists
  their directories; the .pth files there, e.g. the editable install of this checkout, are not run)."""
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
  (site,) = glob.glob(os.path.join(str(path), "lib", "python*", "site-packages"))
  shared = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
  with open(os.path.join(site, "_shared_packages.pth"), "w") as f:
    f.write("\n".join(shared) + "\n")
  return os.path.join(str(path), "bin", "python")


def _run_cell(python: str, source: str, cwd: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0")  # offline: dependencies are already there
  return subprocess.run([python, "-c", source], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _imported_from(python: str, tmp_path) -> str:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return subprocess.run([python, "-c", "import flowar_jax; print(flowar_jax.__file__)"], cwd=str(tmp_path),
                        env=env, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git"))
                    and not os.path.isfile(os.path.join(ROOT, ".git")), reason="needs git and a git checkout")
def test_install_cell_in_fresh_venvs(tmp_path):
  """The cell's own commands, offline: from the clone it runs in, then (as in Colab) from a clone of REPO_URL."""
  clone = tmp_path / "clone"
  subprocess.run(["git", "clone", "-q", ROOT, str(clone)], check=True)
  cell = _install_cell()
  assert "REPO_URL = " in cell

  python = _fresh_venv(tmp_path / "venv_a")
  result = _run_cell(python, cell, str(clone / "notebooks"))  # Jupyter runs a notebook in its folder
  assert result.returncode == 0, result.stdout + result.stderr
  assert f"installed flowar_jax from {clone}" in result.stdout
  assert _imported_from(python, tmp_path) == str(clone / "flowar_jax" / "__init__.py")
  assert _run_cell(python, cell, str(clone / "notebooks")).stdout == ""  # importable now: nothing to do

  python = _fresh_venv(tmp_path / "venv_b")
  colab = tmp_path / "content"
  colab.mkdir()
  missing = str(tmp_path / "no_such_repository")
  result = _run_cell(python, cell.replace("REPO_URL = ", f"REPO_URL = {missing!r}  #", 1), str(colab))
  assert result.returncode != 0 and f"git clone {missing} failed: set REPO_URL" in result.stderr
  result = _run_cell(python, cell.replace("REPO_URL = ", f"REPO_URL = {str(clone)!r}  #", 1), str(colab))
  assert result.returncode == 0, result.stdout + result.stderr
  assert _imported_from(python, tmp_path) == str(colab / "flowar_jax" / "flowar_jax" / "__init__.py")


def test_sample_notebook_text_section_samples_from_prompts(text_run):
  """The prompt section (the cells after its heading) on a tiny trained text run: one column per prompt."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  _, workdir = text_run
  notebook = nbformat.read(os.path.join(ROOT, "notebooks", "sample.ipynb"), as_version=4)
  (start,) = [i for i, c in enumerate(notebook.cells) if c.source.startswith("## Text-to-image: sampling from prompts")]
  settings, *rest = [c.source for c in notebook.cells[start + 1:] if c.cell_type == "code"]
  shown = []
  namespace = {"os": os, "Image": Image, "REPO_DIR": ROOT, "CFG": 0.0, "NUM_STEPS": 2, "SEED": 0,
               "display": shown.append, "print": lambda *a, **k: shown.append(" ".join(map(str, a)))}
  exec(settings, namespace)  # pylint: disable=exec-used
  namespace.update(TEXT_WORKDIR=workdir, PROMPTS="two 4s; a 5 above a 2", PER_PROMPT=2)
  for source in rest:
    exec(source, namespace)  # pylint: disable=exec-used
  assert namespace["text_images"].shape == (4, 16, 16, 3)
  assert "column 2: a 5 above a 2" in shown
  assert isinstance(shown[-1], Image.Image)

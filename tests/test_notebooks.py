"""The notebooks run top to bottom in a real Jupyter kernel: train_digits.ipynb on a shrunken digits run, then
sample.ipynb on the checkpoint it wrote. Parameters go in as papermill does: a cell after the one tagged
`parameters`."""
from __future__ import annotations

import glob
import json
import os

import pytest

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


def test_notebooks_run_top_to_bottom(tmp_path, monkeypatch):
  # The kernels share compiled programs where they match (the sampler of both notebooks at cfg 3, batch 10).
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
  workdir = str(tmp_path / "run")
  train = _execute("train_digits.ipynb", {"WORKDIR": workdir, "OVERRIDES": TINY_RUN}, str(tmp_path))
  assert len(_outputs(train, "image/png")) == 4  # the data, reconstructions, the loss plot, samples
  text = "".join(out.get("text", "") for cell in train.cells if cell.cell_type == "code" for out in cell.outputs)
  assert "digit classifier accuracy on the samples" in text and "tokens/s" in text
  assert os.path.exists(os.path.join(workdir, "samples", "grid.png"))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if "samples" in r] == [6]  # the grid written during training

  sample = _execute("sample.ipynb", {"WORKDIR": workdir, "NUM_STEPS": 2, "PER_CLASS": 1, "CFG": 3.0},
                    str(tmp_path))
  grids = _outputs(sample, "image/png")
  assert len(grids) == 2  # the class grid and the guidance comparison

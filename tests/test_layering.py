"""Arrows only go down: each package's imports (read from the source with `ast`, lazy imports inside functions
included) stay within the layers below it, so the tree shows the architecture and no cycle can creep in."""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flowar_jax")

# package -> packages of flowar_jax it must never import.
_ABOVE_LIBRARIES = ("flowar_jax.training", "flowar_jax.commands", "flowar_jax.cli", "flowar_jax.sweeps")
FORBIDDEN = {
    "models": _ABOVE_LIBRARIES + ("flowar_jax.sampling", "flowar_jax.evaluation", "flowar_jax.convert",
                                  "flowar_jax.runs", "flowar_jax.data"),
    "kernels": _ABOVE_LIBRARIES + ("flowar_jax.models", "flowar_jax.sampling", "flowar_jax.evaluation",
                                   "flowar_jax.convert", "flowar_jax.runs"),
    "parallel": _ABOVE_LIBRARIES + ("flowar_jax.models", "flowar_jax.sampling", "flowar_jax.evaluation",
                                    "flowar_jax.convert", "flowar_jax.runs"),
    "scales": _ABOVE_LIBRARIES + ("flowar_jax.models", "flowar_jax.sampling", "flowar_jax.evaluation",
                                  "flowar_jax.convert", "flowar_jax.runs"),
    "runs": _ABOVE_LIBRARIES + ("flowar_jax.sampling", "flowar_jax.evaluation", "flowar_jax.convert",
                                "flowar_jax.data"),
    "sampling": _ABOVE_LIBRARIES + ("flowar_jax.evaluation", "flowar_jax.convert"),
    "evaluation": _ABOVE_LIBRARIES,
    "convert": _ABOVE_LIBRARIES + ("flowar_jax.sampling", "flowar_jax.evaluation"),
    "serving": _ABOVE_LIBRARIES + ("flowar_jax.evaluation", "flowar_jax.convert"),
    "tokenizers": _ABOVE_LIBRARIES + ("flowar_jax.sampling", "flowar_jax.evaluation", "flowar_jax.convert",
                                      "flowar_jax.runs", "flowar_jax.data"),
    "heads": _ABOVE_LIBRARIES + ("flowar_jax.sampling", "flowar_jax.evaluation", "flowar_jax.convert",
                                 "flowar_jax.runs", "flowar_jax.data"),
    # Frozen text encoders stand beside the models: they read weights (through runs.fs) and nothing above.
    "text": _ABOVE_LIBRARIES + ("flowar_jax.models", "flowar_jax.sampling", "flowar_jax.evaluation",
                                "flowar_jax.convert", "flowar_jax.data", "flowar_jax.heads",
                                "flowar_jax.tokenizers"),
}
# Leaf modules a package may import although their package is above it: parallel's sharding rules match the
# dotted parameter names of models/params (which imports only jax and flax).
EXCEPTIONS = {"parallel": ("flowar_jax.models.params",)}
# runs/ is the run-I/O layer: besides itself it reads only the config schema, the models' parameter structure
# (to restore weights into it) and the sharding plan (to restore them sharded).
RUNS_MAY_IMPORT = ("flowar_jax.runs", "flowar_jax.config", "flowar_jax.models", "flowar_jax.parallel")


def imported_modules(source: str, module: str) -> set[str]:
  """Every flowar_jax module named by an import in `source` (module-level or inside functions), for the module
  named `module` (used to resolve relative imports). `from a import b` yields `a.b` (b may be a module)."""
  package = module.rsplit(".", 1)[0]
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parent = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        base = ".".join(parent + ([base] if base else []))
      found.add(base)
      found.update(f"{base}.{alias.name}" for alias in node.names)
  return {name for name in found if name == "flowar_jax" or name.startswith("flowar_jax.")}


def _modules(package: str):
  for directory, _, files in os.walk(os.path.join(ROOT, package)):
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        relative = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        yield relative.removesuffix(".__init__"), path


def _within(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(package: str) -> list[str]:
  problems = []
  for module, path in _modules(package):
    with open(path, encoding="utf-8") as f:
      imports = imported_modules(f.read(), module)
    for name in sorted(imports):
      if _within(name, EXCEPTIONS.get(package, ())):
        continue
      if _within(name, FORBIDDEN[package]):
        problems.append(f"{module} imports {name}")
      elif package == "runs" and name != "flowar_jax" and not _within(name, RUNS_MAY_IMPORT):
        problems.append(f"{module} imports {name}, which run I/O does not build on")
  return problems


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_layers_below_it(package):
  assert list(_modules(package)), f"no modules found under flowar_jax/{package}"
  assert violations(package) == []


def test_imports_are_found_in_every_form():
  source = """
import flowar_jax.training.loop
from flowar_jax import commands
from flowar_jax.runs.fs import join
from . import fs
from ..sampling import generate

def later():
  from flowar_jax.evaluation import runner
"""
  found = imported_modules(source, "flowar_jax.runs.loaders")
  assert {"flowar_jax.training.loop", "flowar_jax.commands", "flowar_jax.runs.fs.join", "flowar_jax.runs.fs",
          "flowar_jax.sampling.generate", "flowar_jax.evaluation.runner"} <= found
  assert _within("flowar_jax.commands", FORBIDDEN["runs"])
  assert not _within("flowar_jax.trainingx", FORBIDDEN["runs"])

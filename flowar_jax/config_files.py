"""Config files and `key=value` overrides outside the command line (notebooks, sweeps).

  config = load_config("configs/digits.py", {"num_train_steps": 200, "model.scales": (1, 2, 4)})

does what `--config configs/digits.py --config.num_train_steps=200 --config.model.scales='(1,2,4)'` does,
and `override_flags` turns such a mapping back into those flags.
"""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Mapping

import ml_collections


def load_config(path: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """Runs `get_config()` of the Python file at `path` ("FILE" or "FILE:ARG", as the CLI takes it), applies
  `overrides` ({dotted key: value}) and returns the locked config."""
  file, _, arg = path.partition(":")
  config = call_file_function(file, "get_config", *([arg] if arg else []), kind="config")
  config.lock()
  apply_overrides(config, overrides or {})
  return config


def call_file_function(file: str, function: str, *args: Any, kind: str) -> Any:
  """Imports the Python file `file` (e.g. a config or sweep file, not a module of a package) and returns
  `function(*args)` from it; `kind` names the file in errors."""
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{kind} file {file!r} not found")
  spec = importlib.util.spec_from_file_location(f"flowar_{kind}_{abs(hash(os.path.abspath(file)))}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, function):
    raise ValueError(f"{kind} file {file!r} defines no {function}()")
  return getattr(module, function)(*args)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
  """Sets each dotted key of `overrides` in `config`; an unknown key or a value of the wrong type raises an
  error naming the key (lists become tuples where the schema has tuples, ints become floats)."""
  for key, value in overrides.items():
    node, *path = config, *key.split(".")
    for depth, name in enumerate(path):
      if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        raise KeyError(f"unknown config key {key!r} (no {'.'.join(path[:depth + 1])!r} in the config)")
      if depth < len(path) - 1:
        node = node[name]
    leaf, current = path[-1], node[path[-1]]
    if isinstance(current, ml_collections.ConfigDict):
      raise ValueError(f"config key {key!r} is a section, not a value: override its fields instead")
    if isinstance(current, tuple) and isinstance(value, list):
      value = tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if current is not None and type(value) is not type(current):
      raise ValueError(f"config key {key!r} holds a {type(current).__name__} ({current!r}), got "
                       f"{type(value).__name__} {value!r}")
    node[leaf] = value


def flag_value(value: Any) -> str:
  """The text `--config.key=TEXT` needs for `value` to parse back to it."""
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def override_flags(overrides: Mapping[str, Any]) -> list[str]:
  """{'model.width': 64} -> ['--config.model.width=64'] (one argv element each, for the CLI)."""
  return [f"--config.{key}={flag_value(value)}" for key, value in overrides.items()]


def parse_override(config: ml_collections.ConfigDict, text: str) -> tuple[str, Any]:
  """'model.width=64' -> ('model.width', 64), typed by the key's current value in `config` (strings stay
  text; tuples, numbers and bools are Python literals)."""
  key, sep, raw = text.partition("=")
  key = key.strip().removeprefix("--").removeprefix("config.")
  if not sep or not key:
    raise ValueError(f"an override must look like key=value, got {text!r}")
  current = config
  for name in key.split("."):
    if not isinstance(current, ml_collections.ConfigDict) or name not in current:
      raise KeyError(f"unknown config key {key!r} in override {text!r}")
    current = current[name]
  if isinstance(current, str):
    return key, raw
  if isinstance(current, bool):
    if raw.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"config key {key!r} is a bool: give true or false, got {raw!r}")
    return key, raw.lower() in ("true", "1")
  try:
    return key, ast.literal_eval(raw)
  except (ValueError, SyntaxError) as error:
    raise ValueError(f"cannot read the value of override {text!r} as a Python literal") from error

"""Command-line parsing that reports config mistakes as one short error naming the key, not a traceback.

`--config.model.widht=3` would otherwise end in a page of ml_collections internals, a wrong value in a
config file in a traceback through absl, and a missing config file in an OSError at the config's first
read; they become e.g.

  flowar-jax: error: unknown config key 'model.widht' (did you mean 'model.width'?)
  flowar-jax: error: config file 'configs/digit.py' does not exist (the presets are configs/*.py, ...)
"""
from __future__ import annotations

import os
import re
import sys
from typing import NoReturn, Sequence

from absl import flags
from ml_collections import config_flags

USAGE_EXIT_CODE = 2
_CONFIG_FLAG = "config"


def _overrides(argv: Sequence[str]) -> list[str]:
  """Dotted keys of the `--config.KEY=VALUE` / `--config.KEY VALUE` overrides in `argv`."""
  keys = []
  for arg in argv:
    match = re.match(rf"--{_CONFIG_FLAG}\.([\w.]+)", arg)
    if match:
      keys.append(match.group(1))
  return keys


def unknown_key_message(error: BaseException, argv: Sequence[str]) -> str:
  """Names the unknown key of a locked-config AttributeError / KeyError, with its full path when it was
  given as an override, and ml_collections' spelling suggestion."""
  text = str(error)
  found = re.search(r"""['"]?Key "?(\w+)"? does not exist|^\W*(\w+)\W""", text)
  name = next((g for g in (found.groups() if found else ()) if g), None)
  suggestion = re.search(r'Did you mean "(\w+)"', text)
  path = next((key for key in _overrides(argv) if name and name in key.split(".")), None)
  if path is not None:
    message = f"unknown config key {path!r}"
    if suggestion:
      message += f" (did you mean {'.'.join(path.split('.')[:-1] + [suggestion.group(1)])!r}?)"
    return message
  message = f"unknown config key {name!r} set in the config file" if name else f"config error: {text}"
  return message + (f" (did you mean {suggestion.group(1)!r}?)" if suggestion else "")


def shorten_config_file_error(text: str) -> str:
  """absl's 'Error whilst parsing config file' with its traceback -> the first line, the frames in the
  config file itself (file, line and code), and the final exception line."""
  if "Traceback" not in text:
    return text
  lines = text.splitlines()
  head = lines[0].rstrip(":").strip()
  config_file = re.search(rf"--{_CONFIG_FLAG}=([^:\s]+)", head)
  kept = []
  for i, line in enumerate(lines):
    if config_file and line.strip().startswith(f'File "{config_file.group(1)}"'):
      kept.append(line.strip())
      if i + 1 < len(lines):
        kept.append("  " + lines[i + 1].strip())
  last = next((line.strip() for line in reversed(lines) if line.strip()), "")
  return "\n".join([head] + kept + [last])


def _config_file_message(path: str, error: BaseException) -> str:
  path = path.split(":", 1)[0]  # CONFIG[:ARG]
  if not os.path.exists(path):
    return f"config file {path!r} does not exist (the presets are configs/*.py, e.g. --config configs/digits.py)"
  cause = error.__cause__ or error  # ml_collections re-raises the load error as 'not available because ...'
  return f"config file {path!r} did not load: {(str(cause).splitlines() or [type(cause).__name__])[0]}"


def _config_path(argv: Sequence[str]) -> str:
  """The CONFIG of `--config CONFIG` / `--config=CONFIG` in `argv` ('' if absent)."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{_CONFIG_FLAG}="):
      return arg.split("=", 1)[1]
    if arg == f"--{_CONFIG_FLAG}" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def config_file_error(flag_values: flags.FlagValues) -> str | None:
  """Why the parsed --config file did not load, or None. ml_collections keeps a load error (e.g. no such
  file) until the config is first read, which would be mid-command."""
  if _CONFIG_FLAG not in flag_values or flag_values[_CONFIG_FLAG].value is None:
    return None
  flag = flag_values[_CONFIG_FLAG]
  try:
    flag.value.keys  # pylint: disable=pointless-statement  # any attribute read raises the stored error
  except OSError as error:
    return _config_file_message(config_flags.get_config_filename(flag), error)
  return None


def _fail(message: str) -> NoReturn:
  print(f"flowar-jax: error: {message}", file=sys.stderr)
  sys.exit(USAGE_EXIT_CODE)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (use as `app.run(main, flags_parser=parse_flags)`); mistakes exit with code 2."""
  try:
    args = flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as error:
    config_given = _CONFIG_FLAG in flags.FLAGS and flags.FLAGS[_CONFIG_FLAG].present
    if error.flagname.startswith(f"{_CONFIG_FLAG}.") and not config_given:
      _fail(f"--{error.flagname} overrides a key of the --{_CONFIG_FLAG} file, and no --{_CONFIG_FLAG} is given")
    _fail(str(error))
  except OSError as error:  # an override of a config file that did not load
    _fail(_config_file_message(_config_path(argv), error))
  except flags.Error as error:
    _fail(shorten_config_file_error(str(error)))
  except (AttributeError, KeyError) as error:  # a key the locked config doesn't have
    _fail(unknown_key_message(error, argv))
  except (TypeError, ValueError) as error:
    _fail(f"config: {error}")
  problem = config_file_error(flags.FLAGS)
  if problem:
    _fail(problem)
  return args

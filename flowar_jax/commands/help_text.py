"""What `python -m flowar_jax [COMMAND] --help` prints: the command list, or one command's own flags.

absl's own help prints the main module's docstring and every flag of every imported library (absl, JAX,
Orbax, ...). Each command here instead names the few flags it reads, so its help lists those, with their
help text and defaults, and how to override config keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import shutil
import textwrap
from typing import Mapping, Sequence

from absl import flags

_INDENT = 2
_NAME_WIDTH = 28  # flag column; longer names put their help on the next line


@dataclasses.dataclass(frozen=True)
class Command:
  """One command of the command line.

  Attributes:
    summary: one line for the command list.
    description: a paragraph for the command's own help.
    required: flags the command cannot run without, in usage order.
    optional: the other flags it reads.
    notes: help text that replaces a shared flag's own for this command (e.g. what --workdir holds).
  """
  summary: str
  description: str
  required: tuple[str, ...] = ()
  optional: tuple[str, ...] = ()
  notes: Mapping[str, str] = dataclasses.field(default_factory=dict)

  @property
  def flags(self) -> tuple[str, ...]:
    return self.required + self.optional


# Shown in every command's help: how to set config keys, and the flags every command takes.
CONFIG_OVERRIDES = (
    ("--config.KEY=VALUE", "set any config key of the --config file, e.g. --config.batch_size=256, "
     "--config.model.scales='(1,2,4,8,16)' (nested keys use dots; a misspelt key is an error). Every key, "
     "with its default and meaning: flowar_jax/config.py (base_config); the presets: configs/*.py; "
     "`summary --config CONFIG` prints the model's size per module."),
)
GENERAL_FLAGS = (
    ("-v, --verbose", "show library logs (Orbax, JAX) and, with an error, its full traceback; "
     "-v N sets absl's log verbosity"),
    ("-h, --help", "this help"),
    ("--helpfull", "every flag, absl's and the libraries' included"),
)


def _width() -> int:
  return max(60, min(110, shutil.get_terminal_size((100, 24)).columns))


def _rows(rows: Sequence[tuple[str, str]], name_width: int = _NAME_WIDTH) -> str:
  """Two columns: a name, and its help wrapped beside it (or below it when the name is long)."""
  width = _width()
  lines = []
  for name, text in rows:
    body_indent = " " * (_INDENT + name_width)
    wrapped = textwrap.wrap(text, width - len(body_indent)) or [""]
    head = " " * _INDENT + name
    if len(head) < len(body_indent) - 1:
      lines.append(head.ljust(len(body_indent)) + wrapped[0])
      wrapped = wrapped[1:]
    else:
      lines.append(head)
    lines.extend(body_indent + line for line in wrapped)
  return "\n".join(lines)


def _metavar(flag: flags.Flag, metavars: Mapping[str, str]) -> str:
  if flag.name in metavars:
    return metavars[flag.name]
  parser = flag.parser
  if isinstance(parser, flags.EnumParser):
    return "{" + "|".join(parser.enum_values) + "}"
  if isinstance(parser, flags.ListParser):
    return "A,B,..."
  if isinstance(parser, flags.IntegerParser):
    return "INT"
  if isinstance(parser, flags.FloatParser):
    return "FLOAT"
  return "VALUE"


def flag_usage(flag: flags.Flag, metavars: Mapping[str, str]) -> str:
  """`--name VALUE`, or `--[no]name` for a boolean."""
  return f"--[no]{flag.name}" if flag.boolean else f"--{flag.name} {_metavar(flag, metavars)}"


def _help(flag: flags.Flag, text: str) -> str:
  """The help text without absl's '<a|b>: ' prefix of an enum (its usage shows the choices), and the default
  when it is a fixed value (a default of None is described by the help text itself)."""
  text = re.sub(r"^<[^>]*>: ", "", text)
  if flag.default is None:
    return text
  if flag.boolean:
    value = str(flag.default).lower()
  elif isinstance(flag.default, (list, tuple)):
    value = ",".join(map(str, flag.default))
  else:
    value = str(flag.default)
  return f"{text} (default: {value})"


def command_list(prog: str, commands: Mapping[str, Command]) -> str:
  """The top-level help: every command with its one line."""
  rows = _rows([(name, command.summary) for name, command in commands.items()],
               name_width=max(len(name) for name in commands) + 2)
  return (f"usage: {prog} COMMAND [flags]\n\ncommands:\n{rows}\n\n"
          f"`{prog} COMMAND --help` lists a command's flags and how to override config keys.\n\n"
          f"general flags:\n{_rows(GENERAL_FLAGS)}\n")


def command_help(prog: str, name: str, command: Command, flag_values: flags.FlagValues,
                 metavars: Mapping[str, str]) -> str:
  """One command's help: usage, description, its flags with help text and defaults, config overrides."""
  usage = [prog, name] + [flag_usage(flag_values[f], metavars) for f in command.required]
  if command.optional:
    usage.append("[flags]")
  if "config" in command.flags:
    usage.append("[--config.KEY=VALUE ...]")
  rows = []
  for flag_name in command.flags:
    flag = flag_values[flag_name]
    text = _help(flag, command.notes.get(flag_name, flag.help))
    if flag_name in command.required:
      text = "(required) " + text
    rows.append((flag_usage(flag, metavars), text))
  wrap = textwrap.fill(command.description, _width())
  parts = [f"usage: {' '.join(usage)}", wrap, f"flags:\n{_rows(rows)}"]
  if "config" in command.flags:
    parts.append(f"config overrides:\n{_rows(CONFIG_OVERRIDES)}")
  parts.append(f"general flags:\n{_rows(GENERAL_FLAGS)}")
  return "\n\n".join(parts) + "\n"


def closest(word: str, choices: Sequence[str]) -> str | None:
  """The choice `word` is most likely a misspelling of, or None when none is close."""
  matches = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
  return matches[0] if matches else None

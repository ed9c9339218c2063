"""What size an official FlowAR state dict is, read from its parameter shapes, and which preset builds it.

Used to make a size mismatch actionable: "the checkpoint is FlowAR-L: use configs/flowar_l.py".
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np


@dataclasses.dataclass(frozen=True)
class FlowARSize:
  """The shape of a FlowAR model as far as parameter shapes tell (head counts don't change any shape)."""
  width: int
  depth: int  # blocks per stack (encoder and decoder each)
  head_variant: str
  head_depth: int
  head_width: int

  def __str__(self) -> str:
    return (f"width {self.width}, {self.depth} + {self.depth} blocks, head {self.head_variant} with "
            f"{self.head_depth} blocks of width {self.head_width}")


# The released models: size, the preset that builds each (and carries its published sampling settings), and
# the attention heads of the backbone and the head dim of the flow head, which no parameter shape reveals.
PUBLISHED = {
    "FlowAR-S": (FlowARSize(768, 6, "v1", 2, 1024), "configs/flowar_s.py", 12, 64),
    "FlowAR-L": (FlowARSize(1024, 8, "v2", 12, 1024), "configs/flowar_l.py", 16, 64),
    "FlowAR-H": (FlowARSize(1536, 15, "v2", 12, 1536), "configs/flowar_h.py", 16, 64),
}


def _count(names, pattern: str) -> int:
  indices = {int(m.group(1)) for m in (re.match(pattern, n) for n in names) if m}
  return max(indices) + 1 if indices else 0


def flowar_size(state_dict: dict[str, np.ndarray]) -> FlowARSize | None:
  """The size of an official FlowAR state dict, or None when its key parameters are missing."""
  try:
    width = int(state_dict["class_emb.weight"].shape[1])
    head_width = int(state_dict["flownet.input_proj.weight"].shape[0])
  except (KeyError, IndexError, AttributeError):
    return None
  names = list(state_dict)
  variant = "v2" if any(".crossattn." in n for n in names if n.startswith("flownet.")) else "v1"
  return FlowARSize(width, _count(names, r"encoder_blocks\.(\d+)\."), variant,
                    _count(names, r"flownet\.res_blocks\.(\d+)\."), head_width)


def describe_flowar(state_dict: dict[str, np.ndarray]) -> str:
  """One sentence naming the checkpoint's size and, for a released size, the preset to convert it with."""
  size = flowar_size(state_dict)
  if size is None:
    return "The checkpoint has no class_emb.weight or flownet.input_proj.weight: is it a FlowAR checkpoint?"
  for name, (published, preset, _, _) in PUBLISHED.items():
    if size == published:
      return f"The checkpoint is {name} ({size}): convert it with --config {preset}"
  return f"The checkpoint has {size}, which is none of the released sizes: give a config of that size"


def check_published_heads(state_dict: dict[str, np.ndarray], num_heads: int, head_head_dim: int) -> None:
  """Raises ValueError when a released checkpoint is read with head counts other than its own (the shapes fit
  any head count, the computation does not)."""
  size = flowar_size(state_dict)
  for name, (published, preset, heads, head_dim) in PUBLISHED.items():
    if size == published and (num_heads, head_head_dim) != (heads, head_dim):
      raise ValueError(f"the checkpoint is {name}, which has {heads} attention heads and a flow head of head dim "
                       f"{head_dim}, but config.model.num_heads is {num_heads} and config.model.head.head_dim is "
                       f"{head_head_dim}: convert it with --config {preset}")

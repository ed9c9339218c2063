"""Reading the constants of a TensorFlow GraphDef (.pb) without TensorFlow, and naming the FID Inception's.

ADM's evaluator runs `classify_image_graph_def.pb` (the 2015-12-05 Inception graph); its weights are `Const`
nodes. A GraphDef is a protobuf, so this reads the wire format directly (varints and length-delimited
fields) and keeps only float constants: GraphDef.node = 1; NodeDef.name = 1, .op = 2, .attr = 5 (map
entries key = 1, value = 2); AttrValue.tensor = 8; TensorProto.dtype = 1, .tensor_shape = 2 (dim = 2,
size = 1), .tensor_content = 4, .float_val = 5.

`graph_state_dict` renames the graph's weights to pytorch-fid's state-dict names and layouts (conv
`conv2d_params [kh, kw, in, out]` -> `conv.weight [out, in, kh, kw]`, `batchnorm/{gamma, beta,
moving_mean, moving_variance}` -> `bn.{weight, bias, running_mean, running_var}`, `softmax/weights [2048,
1008]` -> `fc.weight [1008, 2048]`), so both files load through one path.
"""
from __future__ import annotations

import numpy as np

_DT_FLOAT = 1
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5

# The graph's stem convs and mixed blocks, in order, with pytorch-fid's names.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCKS = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
           "Mixed_7a", "Mixed_7b", "Mixed_7c")
# Per block type: graph tower -> the branch convs in it, in order (the graph numbers them conv, conv_1, ...).
_TOWERS = {
    "A": {"": ["branch1x1"], "tower": ["branch5x5_1", "branch5x5_2"],
          "tower_1": ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], "tower_2": ["branch_pool"]},
    "B": {"": ["branch3x3"], "tower": ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]},
    "C": {"": ["branch1x1"], "tower": ["branch7x7_1", "branch7x7_2", "branch7x7_3"],
          "tower_1": [f"branch7x7dbl_{i}" for i in range(1, 6)], "tower_2": ["branch_pool"]},
    "D": {"tower": ["branch3x3_1", "branch3x3_2"], "tower_1": [f"branch7x7x3_{i}" for i in range(1, 5)]},
    "E": {"": ["branch1x1"], "tower": ["branch3x3_1"], "tower/mixed": ["branch3x3_2a", "branch3x3_2b"],
          "tower_1": ["branch3x3dbl_1", "branch3x3dbl_2"], "tower_1/mixed": ["branch3x3dbl_3a", "branch3x3dbl_3b"],
          "tower_2": ["branch_pool"]},
}
_BLOCK_TYPES = "AAABCCCCDEE"
_BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    if pos >= len(buf):
      raise ValueError("truncated protobuf varint")
    byte = buf[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if byte < 0x80:
      return value, pos
    shift += 7


def _fields(buf: memoryview):
  """Yields (field number, wire type, value): an int for varints, a memoryview for everything else."""
  pos = 0
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == _VARINT:
      value, pos = _varint(buf, pos)
    elif wire == _BYTES:
      size, pos = _varint(buf, pos)
      value, pos = buf[pos:pos + size], pos + size
    elif wire == _FIXED64:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == _FIXED32:
      value, pos = buf[pos:pos + 4], pos + 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire} (field {number}): not a GraphDef")
    if pos > len(buf):
      raise ValueError("truncated protobuf field: the file is cut short or not a GraphDef")
    yield number, wire, value


def _tensor(buf: memoryview, node: str) -> np.ndarray:
  dtype, shape, content, floats = None, [], None, []
  for number, wire, value in _fields(buf):
    if number == 1:
      dtype = value
    elif number == 2:
      for dim_number, _, dim in _fields(value):
        if dim_number == 2:
          shape.append(next((v for n, _, v in _fields(dim) if n == 1), 0))
    elif number == 4:
      content = bytes(value)
    elif number == 5:
      floats.extend(np.frombuffer(value, "<f4").tolist())  # packed, or one fixed32 per entry
  if dtype != _DT_FLOAT:
    raise ValueError(f"constant {node!r} has TF dtype {dtype}, not float32")
  if content is not None:
    return np.frombuffer(content, "<f4").reshape(shape).copy()
  values = np.asarray(floats, np.float32)
  if values.size == 1:  # a single value fills the shape
    return np.full(shape, values[0], np.float32)
  return values.reshape(shape)


def read_graph_constants(data: bytes, wanted=None) -> dict[str, np.ndarray]:
  """A serialized GraphDef -> {Const node name: float32 array}, for the names in `wanted` (default: all)."""
  out = {}
  for number, wire, node in _fields(memoryview(data)):
    if number != 1 or wire != _BYTES:
      continue
    name = op = tensor = None
    for field, _, value in _fields(node):
      if field == 1:
        name = bytes(value).decode()
      elif field == 2:
        op = bytes(value).decode()
      elif field == 5:
        entry = {n: v for n, _, v in _fields(value)}
        if bytes(entry.get(1, b"")) == b"value" and 2 in entry:
          tensor = next((v for n, _, v in _fields(entry[2]) if n == 8), None)
    if op == "Const" and tensor is not None and (wanted is None or name in wanted):
      out[name] = _tensor(tensor, name)
  return out


def graph_to_torch_names() -> dict[str, str]:
  """{graph layer prefix: pytorch-fid module prefix}, e.g. 'mixed_6/conv' -> 'Mixed_6d.branch1x1'."""
  names = dict(_STEM)
  for index, (block, kind) in enumerate(zip(_BLOCKS, _BLOCK_TYPES)):
    graph_block = "mixed" if index == 0 else f"mixed_{index}"
    for tower, branches in _TOWERS[kind].items():
      for i, branch in enumerate(branches):
        conv = "conv" if i == 0 else f"conv_{i}"
        graph = "/".join(p for p in (graph_block, tower, conv) if p)
        names[graph] = f"{block}.{branch}"
  return names


def graph_state_dict(data: bytes) -> dict[str, np.ndarray]:
  """The FID Inception's weights in a GraphDef -> pytorch-fid's state dict (names and layouts)."""
  prefixes = graph_to_torch_names()
  wanted = {"softmax/weights", "softmax/biases"}
  for graph in prefixes:
    wanted.add(f"{graph}/conv2d_params")
    wanted.update(f"{graph}/batchnorm/{k}" for k in _BN)
  constants = read_graph_constants(data, wanted)
  missing = sorted(wanted - set(constants))
  if missing:
    raise ValueError(f"the graph lacks {len(missing)} of the FID Inception's weights (e.g. {missing[:3]}): is it "
                     "classify_image_graph_def.pb from inception-2015-12-05?")
  out = {}
  for graph, torch in prefixes.items():
    out[f"{torch}.conv.weight"] = constants[f"{graph}/conv2d_params"].transpose(3, 2, 0, 1)
    for key, name in _BN.items():
      out[f"{torch}.bn.{name}"] = constants[f"{graph}/batchnorm/{key}"]
  out["fc.weight"] = constants["softmax/weights"].T
  out["fc.bias"] = constants["softmax/biases"]
  return out

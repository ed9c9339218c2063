"""Where the official PyTorch FlowAR's time goes, op class by op class: the counterpart of
benchmarks/profile_ops.py, so that the two implementations can be compared class by class at matched precision.

  python benchmarks/profile_official.py --official /path/to/FlowAR --mode sample|train [--preset reduced]
      [--autocast bfloat16] [--batch 16] [--num_steps 25 --cfg 4.0] [--repeats 2] [--json ops.json]

Runs the same calls as `official_throughput.py` (its `sample_tokens`, or its training step) `--repeats` times
under `torch.profiler` after one warm-up call, and sums each ATen op's own time (self CPU time: the time spent
in the op itself, not in the ops it calls) into classes named as in profile_ops.py: products, fused attention,
softmax, norms, transcendental and plain elementwise work, data movement (copies, casts, concatenations) and
the rest. What is not inside any op (the Python of the model and the sampler, and the dispatcher between ops)
is reported as the wall time minus the summed op time. All figures are per call, in seconds.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.official_throughput import SIZES, official_model  # noqa: E402

# ATen op names (without the `aten::` prefix) by class; everything else is 'other'.
CLASSES = {
    "product": {"mm", "addmm", "bmm", "baddbmm", "mkldnn_linear", "_mkldnn_linear", "mkldnn_matmul", "dot", "mv",
                "_addmm_activation"},
    "attention (fused)": {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math",
                          "_flash_attention_forward", "_scaled_dot_product_flash_attention_for_cpu_backward"},
    "softmax": {"_softmax", "_softmax_backward_data", "_log_softmax"},
    "norm": {"native_layer_norm", "native_layer_norm_backward", "_fused_rms_norm", "rms_norm"},
    "elementwise (transcendental)": {"gelu", "gelu_backward", "silu", "silu_backward", "exp", "tanh", "sigmoid",
                                     "rsqrt", "sin", "cos", "log", "pow", "sqrt", "erf"},
    "elementwise": {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_", "neg", "addcmul_", "addcdiv_",
                    "lerp_", "where", "clamp", "clamp_", "maximum", "minimum", "_foreach_add_", "_foreach_mul_",
                    "_foreach_addcmul_", "_foreach_addcdiv_", "_foreach_div_", "_foreach_sqrt", "_foreach_lerp_",
                    "_foreach_mul", "_foreach_add", "_foreach_norm", "_foreach_sub_", "fill_", "zero_", "normal_",
                    "uniform_", "bernoulli_", "randn", "rand", "gt", "lt", "eq", "ne", "ge", "le", "logical_not",
                    "sum", "mean", "norm", "linalg_vector_norm", "square", "abs", "rsub", "reciprocal"},
    "data movement": {"copy_", "_to_copy", "cat", "clone", "contiguous", "index", "index_select", "gather",
                      "repeat", "repeat_interleave", "stack", "expand", "_unsafe_view", "empty", "empty_like",
                      "empty_strided", "zeros", "ones", "zeros_like", "ones_like", "full", "arange", "t", "transpose",
                      "permute", "view", "reshape", "slice", "select", "unsqueeze", "squeeze", "split", "chunk",
                      "unbind", "narrow", "as_strided", "flatten", "embedding", "index_put_", "scatter_", "roll",
                      "masked_fill", "masked_fill_", "pad", "constant_pad_nd", "upsample_nearest2d", "_reshape_alias",
                      "resize_", "detach", "alias", "lift_fresh", "scalar_tensor", "item", "_local_scalar_dense"},
}


def op_class(name: str) -> str:
  """`aten::addmm` -> 'product'; an op of no known class -> 'other'."""
  bare = name.split("::", 1)[-1]
  for kind, names in CLASSES.items():
    if bare in names:
      return kind
  return "other"


def profile(call, repeats: int) -> tuple[dict[str, float], dict[str, float], float]:
  """Runs `call` `repeats` times under torch.profiler: (seconds per call by class, by op, wall seconds per
  call)."""
  import torch  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(repeats):
      call()
  wall = (time.perf_counter() - start) / repeats
  by_class, by_op = collections.Counter(), collections.Counter()
  for event in prof.key_averages():
    if not event.key.startswith("aten::"):
      continue  # profiler-internal and autograd-node ranges: their ATen children carry the time
    seconds = event.self_cpu_time_total / 1e6 / repeats
    by_class[op_class(event.key)] += seconds
    by_op[event.key] += seconds
  return dict(by_class), dict(by_op), wall


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--official", required=True, help="checkout of the official FlowAR repository")
  parser.add_argument("--preset", choices=sorted(SIZES), default="reduced")
  parser.add_argument("--mode", choices=("train", "sample"), default="sample")
  parser.add_argument("--autocast", choices=("float32", "bfloat16"), default="bfloat16")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--num_steps", type=int, default=25)
  parser.add_argument("--cfg", type=float, default=4.0)
  parser.add_argument("--guidance", type=float, default=0.9)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--json", help="also write the figures to this file")
  args = parser.parse_args()

  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = official_model(args.official, args.preset)
  autocast = (contextlib.nullcontext if args.autocast == "float32"
              else lambda: torch.autocast("cpu", dtype=torch.bfloat16))
  labels = torch.randint(0, 1000, (args.batch,))
  if args.mode == "sample":
    model.eval()

    def call():
      with torch.no_grad(), autocast():
        model.sample_tokens(num_steps=args.num_steps, guidance=args.guidance, cfg=args.cfg, labels=labels)
  else:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02)
    images = torch.randn(args.batch, 16, 16, 16)

    def call():
      with autocast():
        loss = model(images, labels)
      optimizer.zero_grad()
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
      optimizer.step()

  call()  # warm-up
  by_class, by_op, wall = profile(call, args.repeats)
  in_ops = sum(by_class.values())
  print(f"official {args.mode}, {args.preset}, autocast {args.autocast}, batch {args.batch}: wall {wall:.3f} s per "
        f"call, {in_ops:.3f} s inside ATen ops, {wall - in_ops:.3f} s outside them (Python, dispatch)")
  print(f"{'s per call':>10}  {'share of wall':>13}  class")
  for kind, seconds in sorted(by_class.items(), key=lambda kv: -kv[1]):
    print(f"{seconds:10.3f}  {seconds / wall:12.1%}  {kind}")
  print(f"{wall - in_ops:10.3f}  {(wall - in_ops) / wall:12.1%}  outside ops")
  print(f"\ntop {args.top} ops:")
  for name, seconds in sorted(by_op.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f"{seconds:10.3f}  {seconds / wall:12.1%}  {name} ({op_class(name)})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"mode": args.mode, "preset": args.preset, "autocast": args.autocast, "batch": args.batch,
                 "wall_s": wall, "by_class_s": by_class, "outside_ops_s": wall - in_ops,
                 "by_op_s": dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:50]),
                 "load_1m": os.getloadavg()[0]}, f, indent=1)


if __name__ == "__main__":
  main()

"""The 'adm' Inception input path and the GraphDef reader against TensorFlow itself.

  pip install tensorflow-cpu
  python benchmarks/parity_tf_resize.py [--json OUT]

1. resize: `flowar_jax.evaluation.inception_input(..., 'adm')` vs what the 2015 graph computes on ADM's
   float input: `tf.compat.v1.image.resize_bilinear(x, [299, 299], align_corners=False)` (the ResizeBilinear
   op without half-pixel centres), then (x - 128) / 128, for several input sides.
2. graph: a GraphDef serialised by TensorFlow, holding float Const nodes under the 2015 graph's names
   (random values, plus one constant stored as a single broadcast float_val), read back by
   `flowar_jax.evaluation.tf_graph` and renamed to pytorch-fid's state dict; every array must match exactly.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flowar_jax.evaluation import tf_graph  # pylint: disable=g-import-not-at-top
  from flowar_jax.evaluation.inception_input import inception_input  # pylint: disable=g-import-not-at-top
  from flowar_jax.evaluation.inception_weights import expected_state_dict_shapes  # pylint: disable=g-import-not-at-top

  results = {"tensorflow": tf.__version__}
  rng = np.random.default_rng(0)
  for side in (16, 32, 64, 256, 299, 512):
    images = rng.integers(0, 256, (2, side, side + 3, 3), dtype=np.uint8)  # non-square: both axes differ
    theirs = tf.compat.v1.image.resize_bilinear(images.astype(np.float32), [299, 299], align_corners=False)
    theirs = (theirs.numpy() - 128.0) * 0.0078125
    ours = np.asarray(inception_input(jnp.asarray(images), "adm"))
    results[f"resize_{side}x{side + 3}_max_abs_err"] = float(np.abs(ours - theirs).max())

  shapes = expected_state_dict_shapes()
  graph = tf.Graph()
  expected = {}
  with graph.as_default():
    for graph_prefix, torch_prefix in tf_graph.graph_to_torch_names().items():
      o, i, kh, kw = shapes[f"{torch_prefix}.conv.weight"]
      value = rng.standard_normal((kh, kw, i, o)).astype(np.float32)
      tf.constant(value, name=f"{graph_prefix}/conv2d_params")
      expected[f"{torch_prefix}.conv.weight"] = value.transpose(3, 2, 0, 1)
      for tf_name, torch_name in (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
                                  ("moving_variance", "running_var")):
        value = rng.standard_normal((o,)).astype(np.float32)
        if torch_prefix == "Mixed_5b.branch_pool" and tf_name == "gamma":
          value = np.full((o,), 0.5, np.float32)  # TF stores a constant fill as one float_val
        tf.constant(value, name=f"{graph_prefix}/batchnorm/{tf_name}")
        expected[f"{torch_prefix}.bn.{torch_name}"] = value
    weights = rng.standard_normal((2048, 1008)).astype(np.float32)
    tf.constant(weights, name="softmax/weights")
    tf.constant(rng.standard_normal((1008,)).astype(np.float32), name="softmax/biases")
    expected["fc.weight"] = weights.T
    expected["fc.bias"] = graph.get_tensor_by_name("softmax/biases:0").op.get_attr("value")
  expected["fc.bias"] = tf.make_ndarray(expected["fc.bias"])
  ours = tf_graph.graph_state_dict(graph.as_graph_def().SerializeToString())
  results["graph_keys_identical"] = sorted(ours) == sorted(expected)
  results["graph_arrays_identical"] = all(np.array_equal(ours[k], expected[k]) for k in expected)
  results["graph_state_dict_fits_model"] = {k: tuple(v.shape) for k, v in ours.items()} == shapes
  print(json.dumps(results, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()

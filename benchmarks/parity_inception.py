"""Numerical parity of flowar_jax's FID InceptionV3 with pytorch-fid's, on random or real weights.

  pip install torch torchvision pytorch-fid
  python benchmarks/parity_inception.py [--weights pt_inception-2015-12-05-6726825d.pth] [--size 256] [--json OUT]

pytorch-fid's network is built by pytorch-fid itself (`pytorch_fid.inception.InceptionV3`); without
`--weights` its weight download is replaced by a random state dict (He-scaled convs, random batch-norm
statistics), so no file is fetched. The same state dict goes through `flowar_jax.evaluation.inception_weights`.
Both sides get the same random uint8 images of side `--size`; ours uses the 'pytorch-fid' resize mode. Compared,
in float32 on the CPU (error = max|ours - theirs| / max|theirs|):

  keys     the state dict's names and shapes (must be identical)
  input    the resized, normalised 299x299 input
  pool     pool3 features [B, 2048]
  logits   fc(pool3) [B, 1008]
  mixed_6  Mixed_6d.branch1x1 after ReLU (the TF graph's mixed_6/conv, sFID's source) [B, 17, 17, 192]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rel_err(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))


def random_state_dict(template: dict, seed: int) -> dict:
  """Random weights shaped like `template` (a torch state dict) that keep activations O(1)."""
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  out = {}
  for name, value in template.items():
    if not value.is_floating_point():
      out[name] = value.clone()
    elif name.endswith("conv.weight") or name == "fc.weight":
      out[name] = torch.randn(value.shape, generator=gen) * np.sqrt(2.0 / np.prod(value.shape[1:]))
    elif name.endswith("running_var"):
      out[name] = 0.5 + torch.rand(value.shape, generator=gen)
    elif name.endswith("bn.weight"):
      out[name] = 1.0 + 0.1 * torch.randn(value.shape, generator=gen)
    else:
      out[name] = 0.1 * torch.randn(value.shape, generator=gen)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--weights", default="", help="pytorch-fid's .pth (default: random weights)")
  parser.add_argument("--size", type=int, default=256, help="side of the random input images")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default="", help="write the errors here")
  args = parser.parse_args()

  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from pytorch_fid import inception as pfid  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flowar_jax.evaluation.inception_input import inception_input  # pylint: disable=g-import-not-at-top
  from flowar_jax.evaluation.inception_weights import (  # pylint: disable=g-import-not-at-top
      expected_state_dict_shapes, inception_from_state_dict)

  if args.weights:
    state_dict = torch.load(args.weights, map_location="cpu", weights_only=True)
  else:
    template = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                               init_weights=False).state_dict()
    state_dict = random_state_dict(template, args.seed)
  pfid.load_state_dict_from_url = lambda *a, **k: state_dict  # no download: hand pytorch-fid these weights
  theirs = pfid.InceptionV3(output_blocks=[3], resize_input=True, normalize_input=True).eval()
  full = pfid.fid_inception_v3().eval()  # the patched torchvision Inception3, with its classifier
  captured = {}
  full.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.__setitem__("mixed_6", o))

  errors = {}
  theirs_shapes = {k: tuple(v.shape) for k, v in full.state_dict().items() if not k.endswith("num_batches_tracked")}
  ours_shapes = expected_state_dict_shapes()
  errors["keys_identical"] = theirs_shapes == ours_shapes
  if theirs_shapes != ours_shapes:
    print("key mismatch:", sorted(set(theirs_shapes.items()) ^ set(ours_shapes.items()))[:10])

  rng = np.random.default_rng(args.seed)
  images = rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  with torch.no_grad():
    pool_t = theirs(x)[0][:, :, 0, 0].numpy()
    resized = 2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    logits_t = full(resized).numpy()  # eval mode: no aux head, dropout off
  mixed_t = captured["mixed_6"].permute(0, 2, 3, 1).numpy()

  model = inception_from_state_dict({k: v.numpy() for k, v in state_dict.items()})
  ours_input = inception_input(jnp.asarray(images), "pytorch-fid")
  out = jax.jit(lambda m, v: m(v))(model, ours_input)
  errors["input"] = rel_err(ours_input, resized.permute(0, 2, 3, 1).numpy())
  errors["pool"] = rel_err(out["pool"], pool_t)
  errors["logits"] = rel_err(out["logits"], logits_t)
  errors["mixed_6"] = rel_err(out["mixed_6_conv"], mixed_t)
  errors["weights"] = args.weights or f"random (seed {args.seed})"
  errors["torch"], errors["jax"] = torch.__version__, jax.__version__
  print(json.dumps(errors, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(errors, f, indent=1)


if __name__ == "__main__":
  main()

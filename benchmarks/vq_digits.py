"""Trains the tiny multi-scale VQ tokenizer of VAR's digits preset on the bundled digits and reports what it
learnt (docs figures come from this script):

  python benchmarks/vq_digits.py --workdir runs/vq_digits [--steps 300] [--learning_rate 1e-3] [--json FILE]

The tokenizer: 64 codes of width 8, ch 32, ch_mult (1, 2, 2), one res block, scales 1, 2, 3, 4 on 16 x 16
images. Prints the training metrics at each log step (l1, l2, codebook usage and perplexity, codes restarted),
then, on the held-out digits (never trained on), the reconstruction error of `MultiScaleVQVAE.reconstruct`
(the inference path, loaded from the checkpoint through `VQTrainable.vae`) and the share of codes the held-out
images use, for the trained and the untrained tokenizer. A rerun with the same --workdir resumes.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from flowar_jax import data  # noqa: E402
from flowar_jax.config import base_config  # noqa: E402
from flowar_jax.runs.loaders import load_params  # noqa: E402
from flowar_jax.runs.metrics import read_metrics  # noqa: E402
from flowar_jax.runs.workdir import find_vae_checkpoints, vae_dir  # noqa: E402
from flowar_jax.training.vq_stage import train_vq, vq_trainable  # noqa: E402

TINY_VQ = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, quant_resi=0.5,
               share_quant_resi=4, using_znorm=False, quant_conv_ks=3, patch_nums=(1, 2, 3, 4))


def vq_digits_config(steps: int, learning_rate: float, batch_size: int) -> ml_collections.ConfigDict:
  c = base_config()
  c.unlock()
  c.data.update(name="digits", image_size=16, resize_size=0, random_crop=False, random_flip=False)
  c.vae = ml_collections.ConfigDict(TINY_VQ)
  c.vae.train = ml_collections.ConfigDict(dict(
      batch_size=batch_size, num_train_steps=steps, learning_rate=learning_rate, warmup_steps=min(50, steps),
      l1_weight=1.0, l2_weight=1.0, commitment_weight=0.25, usage_decay=0.99, restart_every_steps=100,
      dead_code_threshold=0.03))
  c.log_every_steps = 25
  c.checkpoint_every_steps = 100
  c.lock()
  return c


def heldout_figures(vqvae, config) -> dict:
  """Mean |x - x'| and MSE over the held-out digits, and the share of the codes their tokens use."""
  encode = nnx.jit(lambda m, x: m.quantize.quantize(m.features(x))[0])
  decode = nnx.jit(lambda m, ids: m.decode_indices(ids))
  abs_err = sq_err = count = 0.0
  used = np.zeros(vqvae.vocab_size, bool)
  for batch in data.make_eval_batches(config.data, 128):
    images, mask = jnp.asarray(batch["image"]), batch["mask"]
    indices = encode(vqvae, images)
    error = np.asarray(decode(vqvae, indices) - images)[mask]
    abs_err, sq_err, count = abs_err + np.abs(error).sum(), sq_err + np.square(error).sum(), count + error.size
    for idx in indices:
      used[np.unique(np.asarray(idx)[mask])] = True
  return {"l1": float(abs_err / count), "mse": float(sq_err / count), "codes_used": float(used.mean())}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--learning_rate", type=float, default=1e-3)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  config = vq_digits_config(args.steps, args.learning_rate, args.batch_size)
  stage_dir = vae_dir(config, args.workdir)
  train_vq(config, stage_dir)

  rows = [r for r in read_metrics(stage_dir) if "l1" in r]
  print(f"{'step':>5} {'l1':>7} {'l2':>7} {'usage':>6} {'perplexity':>10} {'restarted':>9}")
  for r in rows:
    print(f"{r['step']:>5} {r['l1']:7.4f} {r['l2']:7.4f} {r['codebook_usage']:6.3f} "
          f"{r['codebook_perplexity']:10.2f} {int(r['codebook_restarted']):>9}")
  factory = functools.partial(vq_trainable, config, config.seed)
  trained = load_params(factory, find_vae_checkpoints(config, args.workdir), use_ema=False).vae
  result = {"steps": args.steps, "train_log": rows, "heldout_trained": heldout_figures(trained, config),
            "heldout_untrained": heldout_figures(factory().vae, config)}
  for name in ("untrained", "trained"):
    f = result[f"heldout_{name}"]
    print(f"held-out, {name:>9}: l1 {f['l1']:.4f}  mse {f['mse']:.4f}  codes used {f['codes_used']:.3f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()

"""HART's hybrid tokenizer on the bundled digits: what the continuous residual adds to the discrete tokens
(docs/hart.md, "The hybrid tokenizer's gain on the digits", comes from this script):

  # train one (configs/var_digits.py's tokenizer, as a HybridTokenizer, HART's alternating paths), then report
  python benchmarks/hybrid_digits.py --workdir runs/hybrid_digits --train_steps 500 [--json FILE]
  # report on a workdir whose tokenizer stage trained a HybridTokenizer
  python benchmarks/hybrid_digits.py --workdir WORKDIR

On the held-out digits (never trained on), each image goes through `HybridTokenizer.encode` and is decoded
twice: from the discrete tokens only, and from the discrete tokens plus the continuous residual (hybrid); a
third row decodes the discrete tokens as training's discrete path does (phi at the last scale too). For
each it prints the reconstruction error (MSE and mean |x - x'| in [-1, 1] pixels) and the digits metric of
the reconstructions (`evaluation.digits`: the classifier's accuracy on the true labels and the Frechet
distance of its features to the train split's), beside the real held-out images' own digits metric. It also
prints the residual's mean |r| and its share of the latent energy on those images.

The tokenizer stage writes WORKDIR/vae; a rerun with the same --workdir resumes (or, with the stage already
at --train_steps, only reports).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from flowar_jax import data  # noqa: E402
from flowar_jax.config_files import load_config  # noqa: E402
from flowar_jax.evaluation.digits import digits_metrics, real_heldout_metrics  # noqa: E402
from flowar_jax.runs import fs  # noqa: E402
from flowar_jax.runs.checkpointing import Checkpointer  # noqa: E402
from flowar_jax.runs.loaders import load_params  # noqa: E402
from flowar_jax.runs.metrics import read_metrics  # noqa: E402
from flowar_jax.runs.workdir import find_vae_checkpoints, vae_dir  # noqa: E402
from flowar_jax.sampling.sampler import to_uint8  # noqa: E402
from flowar_jax.tokenizers.hybrid import HybridTokenizer  # noqa: E402
from flowar_jax.tokenizers.vq_trainable import VQTrainable, vqvae_kwargs  # noqa: E402
from flowar_jax.training.vq_stage import train_vq  # noqa: E402

# discrete: HybridTokenizer's inference walk without the residual (the last scale's codes added without phi);
# hybrid: with the residual; discrete_phi: the walk training decodes on its discrete path (`training_forward`:
# phi at the last scale too, as VAR's `reconstruct`).
PATHS = ("discrete", "hybrid", "discrete_phi")
NAMES = {"discrete": "discrete tokens only", "hybrid": "discrete + residual (hybrid)",
         "discrete_phi": "discrete, training's walk"}
VAR_DIGITS = os.path.join(ROOT, "configs", "var_digits.py")


def hybrid_factory(config: ml_collections.ConfigDict):
  """What the stage trains: `config.vae`'s layout as a HybridTokenizer (seed `config.seed`)."""
  return lambda: VQTrainable(HybridTokenizer(**vqvae_kwargs(config.vae), rngs=nnx.Rngs(config.seed)))


def train_config(steps: int, skip_continuous_prob: float) -> ml_collections.ConfigDict:
  """configs/var_digits.py with its tokenizer section trained for `steps` with HART's alternating paths."""
  config = load_config(VAR_DIGITS)
  config.unlock()
  config.vae.train.num_train_steps = steps
  config.vae.train.skip_continuous_prob = skip_continuous_prob
  return config


def stored_tokenizer_config(workdir: str) -> tuple[ml_collections.ConfigDict, str]:
  """(the config stored with WORKDIR's tokenizer checkpoint, its checkpoint directory); an error unless that
  stage trained a HybridTokenizer (its metrics carry the residual statistics only the hybrid path logs)."""
  directory = find_vae_checkpoints(load_config(VAR_DIGITS), workdir)
  with Checkpointer(directory) as checkpointer:
    config = checkpointer.restore_config()
  if config is None:
    raise FileNotFoundError(f"the tokenizer checkpoint in {directory!r} stores no config")
  stage = vae_dir(config, workdir)
  metrics = read_metrics(stage) if fs.exists(fs.join(stage, "metrics.jsonl")) else []
  if not any("residual_abs" in r for r in metrics):
    raise ValueError(f"the tokenizer in {stage!r} was not trained as a HybridTokenizer: its metrics.jsonl logs "
                     f"no residual statistics (train one with --train_steps N)")
  return config, directory


def heldout_report(tokenizer: HybridTokenizer, data_config: ml_collections.ConfigDict) -> dict:
  """Reconstruction error and digits metric of the held-out digits, discrete-only and hybrid, and the
  residual's statistics over them."""
  encode = nnx.jit(lambda m, x: m.encode(x))
  decode = nnx.jit(lambda m, t, continuous: m.decode_tokens(t, continuous), static_argnums=2)
  var_walk = nnx.jit(lambda m, x: m.reconstruct(x))
  residual = nnx.jit(lambda m, x: (m.residual(m.encode(x)), m.features(x)))
  sums = {p: np.zeros(2) for p in PATHS}
  recons = {p: [] for p in PATHS}
  labels, count, res_abs, res_sq, f_sq, res_count = [], 0, 0.0, 0.0, 0.0, 0
  for batch in data.make_eval_batches(data_config, 128):
    images, mask = jnp.asarray(batch["image"]), batch["mask"]
    tokens = encode(tokenizer, images)
    for path in PATHS:
      recon = var_walk(tokenizer, images) if path == "discrete_phi" else decode(tokenizer, tokens, path == "hybrid")
      recon = np.asarray(recon)[mask]
      error = recon - np.asarray(images)[mask]
      sums[path] += (np.square(error).sum(), np.abs(error).sum())
      recons[path].append(np.asarray(to_uint8(jnp.asarray(recon))))
    r, f = (np.asarray(a)[mask] for a in residual(tokenizer, images))
    res_abs, res_sq, f_sq, res_count = res_abs + np.abs(r).sum(), res_sq + np.square(r).sum(), \
        f_sq + np.square(f).sum(), res_count + r.size
    labels.append(batch["label"][mask])
    count += int(mask.sum()) * int(np.prod(images.shape[1:]))
  labels = np.concatenate(labels)
  out = {"num_images": int(len(labels)), "residual_abs": float(res_abs / res_count),
         "residual_energy_share": float(res_sq / f_sq)}
  for path in PATHS:
    metrics = digits_metrics(np.concatenate(recons[path]), labels, data_config.eval_fraction)
    out[path] = {"mse": float(sums[path][0] / count), "mean_abs": float(sums[path][1] / count), **metrics}
  out["real"] = real_heldout_metrics(data_config.image_size, data_config.eval_fraction)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--train_steps", type=int, default=0,
                      help="train (or resume) the hybrid tokenizer to this many steps first; 0: only report")
  parser.add_argument("--skip_continuous_prob", type=float, default=0.5,
                      help="probability of the discrete-only path per training step")
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  if args.train_steps < 0:
    parser.error(f"--train_steps must be >= 0, got {args.train_steps}")
  if args.train_steps:
    config = train_config(args.train_steps, args.skip_continuous_prob)
    train_vq(config, vae_dir(config, args.workdir), model_factory=hybrid_factory(config))
  config, directory = stored_tokenizer_config(args.workdir)
  tokenizer = load_params(hybrid_factory(config), directory, use_ema=False).vae
  report = heldout_report(tokenizer, config.data)
  report["tokenizer_train_steps"] = int(config.vae.train.num_train_steps)

  print(f"held-out digits: {report['num_images']} images; tokenizer trained {report['tokenizer_train_steps']} "
        f"steps; residual mean |r| {report['residual_abs']:.4f}, "
        f"share of the latent energy {report['residual_energy_share']:.4f}")
  print(f"| {'decoded from':<28} | {'MSE':>7} | {'mean |diff|':>11} | {'digits accuracy':>15} | "
        f"{'digits FD':>9} |")
  print(f"|{'-' * 30}|{'-' * 8}:|{'-' * 12}:|{'-' * 16}:|{'-' * 10}:|")
  for path in PATHS:
    r = report[path]
    print(f"| {NAMES[path]:<28} | {r['mse']:7.4f} | {r['mean_abs']:11.4f} | {r['digits_accuracy']:15.3f} | "
          f"{r['digits_fd']:9.3f} |")
  real = report["real"]
  print(f"| {'real held-out images':<28} | {'-':>7} | {'-':>11} | {real['digits_accuracy']:15.3f} | "
        f"{real['digits_fd']:9.3f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()

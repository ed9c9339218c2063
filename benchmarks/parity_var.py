"""Numerical parity of flowar_jax's VAR, VQVAE and sampler with the official PyTorch VAR, on random weights.

  python benchmarks/parity_var.py --official /path/to/VAR --torch-python /path/to/torch/venv/bin/python \
      [--runs reduced,d16] [--json OUT]

`--official` is a checkout of the official VAR repository (the directory holding `models/` and `dist.py`).
The official side runs in a separate Python that has torch (`--torch-python`; torch, numpy and scipy needed;
`huggingface_hub` is stubbed if absent, `.cuda()` is a no-op): it builds the models with the official
`build_vae_var`, randomises every parameter, computes its outputs in float32 on the CPU and writes state dicts,
inputs and outputs to an .npz. This script then converts the state dicts with `flowar_jax.convert.var`, computes
the same outputs with the JAX modules and compares:

  logits        teacher-forced logits `[B, L, V]` for the official next-scale inputs (label dropout off)
  tf_input      the VQ's teacher-forcing input (f_hat accumulated and area-resized per scale) from indices
  encode        VQ indices of random images: the number of tokens that differ (must be 0)
  decode        images decoded from the official indices
  reconstruct   images through encode, quantise and decode
  sample        a full CFG sample with top-k / top-p from the same uniform draws: tokens that differ (must be
                0), and `sample_image`, the decoded images
  smooth        the same with `more_smooth` (Gumbel-softmax code mixtures), `smooth_image` its images

Randomness: the official sampler draws tokens with `torch.multinomial` and Gumbel noise with
`Tensor.exponential_` from its generator. For a token-for-token comparison both are replaced, on the official
side, by the same draws that ours consumes: a token is the first vocabulary entry whose cumulative probability
exceeds u * total, and the exponential draw is -log(u). Everything else runs as the official code has it.

Errors are max|ours - official| / max|official|; the check passes when every relative error is at most --tol
(1e-4) and every token count is 0, except `smooth_image`, held to the tolerance or, where larger, twice the
official code's own float32-vs-float64 spread on that sample (`official_smooth_f32_vs_f64`, a diagnostic: the
official smooth sampler rerun in float64 from the same draws; the Gumbel softmax at temperature ~0.01 turns
float32 rounding of the logits into visible changes of the code mixture).

Runs: 'reduced' = three small VARs (depth 2 with attn_l2_norm, with shared adaLN, and without attn_l2_norm)
on a 32-channel VQVAE with scales (1, 2, 3, 4) on 64 px; 'd16' = VAR-d16 with the full `vae_ch160v4096z32` on
256 px (the JAX side peaks at about 7 GB of memory).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN_METRICS = ("encode", "sample", "smooth", "official_smooth_f64_tokens")
# The official code against itself: how far float32 rounding alone moves a smooth sample. Not checks.
DIAGNOSTIC = ("official_smooth_f32_vs_f64", "official_smooth_f64_tokens")


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  depth: int
  patch_nums: tuple[int, ...]
  vocab_size: int
  cvae: int
  ch: int
  num_classes: int
  shared_aln: bool = False
  attn_l2_norm: bool = True
  batch: int = 2
  top_k: int = 900
  top_p: float = 0.96
  cfg: float = 1.5
  smooth_cfg: float = 4.0
  smooth_top_p: float = 0.95

  def vae_kwargs(self) -> dict:
    return dict(vocab_size=self.vocab_size, z_channels=self.cvae, ch=self.ch, patch_nums=self.patch_nums)

  def var_kwargs(self) -> dict:
    return dict(depth=self.depth, num_classes=self.num_classes, vocab_size=self.vocab_size, cvae=self.cvae,
                patch_nums=self.patch_nums, shared_aln=self.shared_aln, attn_l2_norm=self.attn_l2_norm)


_SMALL = dict(depth=2, patch_nums=(1, 2, 3, 4), vocab_size=64, cvae=8, ch=32, num_classes=10, top_k=16, top_p=0.9)
RUNS = {
    "reduced": (Run("reduced", **_SMALL), Run("reduced-shared-aln", **{**_SMALL, "shared_aln": True}),
                Run("reduced-no-l2", **{**_SMALL, "attn_l2_norm": False})),
    "d16": (Run("d16", 16, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 4096, 32, 160, 1000),),
}


def _select(name: str) -> tuple[Run | None, ...]:
  if name in RUNS:
    return RUNS[name]
  return tuple(r for group in RUNS.values() for r in group if r.name == name) or (None,)


def rel_err(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))


# ------------------------------------------------------------------------------------------------ official side


def _import_official(path: str):
  import torch  # pylint: disable=g-import-not-at-top
  torch.Tensor.cuda = lambda self, *a, **k: self
  torch.nn.Module.cuda = lambda self, *a, **k: self
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:  # only VARHF (not used here) needs it
    sys.modules["huggingface_hub"] = types.SimpleNamespace(PyTorchModelHubMixin=object)
  sys.path.insert(0, os.path.abspath(path))
  import models  # pylint: disable=g-import-not-at-top
  import models.var  # pylint: disable=g-import-not-at-top
  return models, models.var


def _randomize(module, seed: int) -> None:
  """Every parameter random, at scales that keep activations O(1): matrices and conv kernels ~ N(0, 1/fan_in),
  norm weights ~ 1 + N(0, 0.1^2), embeddings and position tables ~ N(0, 0.5^2), the per-head attention scale
  ~ log 4 + N(0, 0.5^2), the rest ~ N(0, 0.05^2)."""
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("scale_mul_1H11"):
        p.copy_(float(np.log(4.0)) + 0.5 * noise)
      elif any(k in name for k in ("class_emb", "lvl_embed", "pos_start", "pos_1LC", "quantize.embedding")):
        p.copy_(0.5 * noise)
      elif name.endswith("weight") and p.ndim >= 2:
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
      elif name.endswith("weight") and p.ndim == 1:
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(0.05 * noise)


def _official_sample(var_mod, var, labels, uniforms, gumbels, *, cfg, top_k, top_p, more_smooth):
  """The official `autoregressive_infer_cfg` with its generator's draws replaced by the given uniforms.

  -> (tokens [B, L], images [B, 3, H, W] in [0, 1])."""
  import torch  # pylint: disable=g-import-not-at-top
  token_draws = [torch.from_numpy(u) for u in uniforms]
  gumbel_draws = [torch.from_numpy(g) for g in gumbels] if gumbels is not None else []
  tokens = []

  def multinomial(probs, num_samples, replacement=False, generator=None):
    u = token_draws.pop(0).reshape(-1, 1)
    cdf = probs.cumsum(dim=-1)
    idx = (cdf <= u * cdf[:, -1:]).sum(dim=-1).clamp_(max=probs.shape[-1] - 1)
    return idx.view(-1, 1).expand(-1, num_samples)

  def exponential_(self, lambd=1.0, generator=None):
    return self.copy_(-torch.log(gumbel_draws.pop(0).view_as(self)))

  sampler = var_mod.sample_with_top_k_top_p_

  def recording_sampler(*args, **kwargs):
    out = sampler(*args, **kwargs)
    tokens.append(out[:, :, 0].clone())
    return out

  multinomial_0, exponential_0 = torch.multinomial, torch.Tensor.exponential_
  torch.multinomial, torch.Tensor.exponential_ = multinomial, exponential_
  var_mod.sample_with_top_k_top_p_ = recording_sampler
  try:
    with torch.no_grad():
      img = var.autoregressive_infer_cfg(B=len(labels), label_B=torch.from_numpy(labels), g_seed=0, cfg=cfg,
                                         top_k=top_k, top_p=top_p, more_smooth=more_smooth)
  finally:
    torch.multinomial, torch.Tensor.exponential_ = multinomial_0, exponential_0
    var_mod.sample_with_top_k_top_p_ = sampler
  assert not token_draws and not gumbel_draws, "the official sampler drew a different number of times"
  return torch.cat(tokens, 1).numpy(), img.numpy()


def official_side(official: str, run: Run, seed: int, out_path: str) -> None:
  """Runs in the torch interpreter: builds, randomises and evaluates the official models; writes an .npz."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_grad_enabled(False)
  models, var_mod = _import_official(official)
  vae, var = models.build_vae_var(device="cpu", patch_nums=run.patch_nums, V=run.vocab_size, Cvae=run.cvae,
                                  ch=run.ch, share_quant_resi=4, num_classes=run.num_classes, depth=run.depth,
                                  shared_aln=run.shared_aln, attn_l2_norm=run.attn_l2_norm,
                                  flash_if_available=False, fused_if_available=False)
  _randomize(vae, seed)
  _randomize(var, seed + 1)
  vae.eval()
  var.eval()
  var.cond_drop_rate = 0.0  # the official forward drops labels even in eval mode
  rng = np.random.default_rng(seed)
  side = 16 * run.patch_nums[-1]
  b = run.batch
  images = rng.uniform(-1, 1, (b, 3, side, side)).astype(np.float32)
  labels = (np.arange(1, b + 1) * 7 % run.num_classes).astype(np.int64)
  out = {"images": images, "labels": labels}
  idx = vae.img_to_idxBl(torch.from_numpy(images))
  out["indices"] = torch.cat(idx, 1).numpy()
  x_in = vae.quantize.idxBl_to_var_input(idx)
  out["tf_input"] = x_in.numpy()
  out["decode"] = vae.idxBl_to_img(idx, same_shape=True, last_one=True).numpy()
  out["reconstruct"] = vae.img_to_reconstructed_img(torch.from_numpy(images), last_one=True).numpy()
  out["logits"] = var(torch.from_numpy(labels), x_in).numpy()
  lengths = [p * p for p in run.patch_nums]
  for name, cfg, top_p, smooth in (("sample", run.cfg, run.top_p, False),
                                   ("smooth", run.smooth_cfg, run.smooth_top_p, True)):
    uniforms = [rng.uniform(size=(b, n)).astype(np.float32) for n in lengths]
    gumbels = ([rng.uniform(np.finfo(np.float32).tiny, 1, size=(b, n, run.vocab_size)).astype(np.float32)
                for n in lengths] if smooth else None)
    tokens, img = _official_sample(var_mod, var, labels, uniforms, gumbels, cfg=cfg, top_k=run.top_k,
                                   top_p=top_p, more_smooth=smooth)
    out[f"{name}_tokens"], out[f"{name}_image"] = tokens, img
    for i, u in enumerate(uniforms):
      out[f"{name}_u/{i}"] = u
    for i, g in enumerate(gumbels or []):
      out[f"{name}_g/{i}"] = g
  for prefix, module in (("vae", vae), ("var", var)):
    for k, v in module.state_dict().items():
      out[f"{prefix}/{k}"] = v.detach().cpu().numpy()
  # Diagnostic: the official smooth sampler in float64 against its own float32 run, same draws.
  var.double()
  vae.double()
  n = len(lengths)
  to_float = torch.Tensor.float
  torch.Tensor.float = lambda self, *a, **k: self  # the official head casts to float32
  try:
    tokens, img = _official_sample(var_mod, var, labels, [out[f"smooth_u/{i}"] for i in range(n)],
                                   [out[f"smooth_g/{i}"] for i in range(n)], cfg=run.smooth_cfg, top_k=run.top_k,
                                   top_p=run.smooth_top_p, more_smooth=True)
  finally:
    torch.Tensor.float = to_float
  out["smooth_f64_tokens"], out["smooth_f64_image"] = tokens, img.astype(np.float32)
  np.savez(out_path, **out)


# ------------------------------------------------------------------------------------------------ our side


def our_side(run: Run, data) -> dict[str, float]:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from flowar_jax.convert.var import load_var, load_vqvae  # pylint: disable=g-import-not-at-top
  from flowar_jax.heads import CategoricalSampling  # pylint: disable=g-import-not-at-top
  from flowar_jax.models.var import sample  # pylint: disable=g-import-not-at-top

  vae_sd = {k[len("vae/"):]: data[k] for k in data.files if k.startswith("vae/")}
  var_sd = {k[len("var/"):]: data[k] for k in data.files if k.startswith("var/")}
  vq = load_vqvae(vae_sd, run.vae_kwargs())
  var = load_var(var_sd, run.var_kwargs())
  del vae_sd, var_sd
  nhwc = lambda a: np.asarray(a).transpose(0, 2, 3, 1)
  lengths = np.cumsum([0] + [p * p for p in run.patch_nums])
  split = lambda flat: [jnp.asarray(flat[:, a:b]) for a, b in zip(lengths[:-1], lengths[1:])]
  out = {}
  labels = jnp.asarray(data["labels"].astype(np.int32))
  indices = vq.encode(jnp.asarray(nhwc(data["images"])))
  out["encode"] = int(np.sum(np.concatenate([np.asarray(i) for i in indices], 1) != data["indices"]))
  theirs_idx = split(data["indices"].astype(np.int32))
  out["tf_input"] = rel_err(vq.quantize.teacher_forcing_input(theirs_idx), data["tf_input"])
  out["decode"] = rel_err(vq.decode_indices(theirs_idx), nhwc(data["decode"]))
  out["reconstruct"] = rel_err(vq.reconstruct(jnp.asarray(nhwc(data["images"]))), nhwc(data["reconstruct"]))
  forward = nnx.jit(lambda model, x: model(labels, x))  # weights as arguments, not baked-in constants
  out["logits"] = rel_err(forward(var, jnp.asarray(data["tf_input"])), data["logits"])
  for name, cfg, top_p, smooth in (("sample", run.cfg, run.top_p, False),
                                   ("smooth", run.smooth_cfg, run.smooth_top_p, True)):
    settings = CategoricalSampling(cfg=cfg, top_k=run.top_k, top_p=top_p, more_smooth=smooth)
    uniforms = [jnp.asarray(data[f"{name}_u/{i}"]) for i in range(len(run.patch_nums))]
    gumbels = [jnp.asarray(data[f"{name}_g/{i}"]) for i in range(len(run.patch_nums))] if smooth else None
    result = sample(var, vq, labels, settings, (uniforms, gumbels))
    tokens = np.concatenate([np.asarray(t) for t in result.tokens], 1)
    out[name] = int(np.sum(tokens != data[f"{name}_tokens"]))
    image = (vq.decode_fhat(result.f_hat) + 1) * 0.5
    out[f"{name}_image"] = rel_err(image, nhwc(data[f"{name}_image"]))
  out["official_smooth_f32_vs_f64"] = rel_err(data["smooth_image"], data["smooth_f64_image"])
  out["official_smooth_f64_tokens"] = int(np.sum(data["smooth_f64_tokens"] != data["smooth_tokens"]))
  return out


def bound(result: dict[str, float], metric: str, tol: float) -> float:
  """The largest passing value: 0 differing tokens; `tol` for relative errors, except a smooth sample's image,
  held to `tol` or, where larger, twice the official code's own float32-vs-float64 spread on it (the Gumbel
  softmax at temperature ~0.01 amplifies float32 rounding of the logits; see docs/var.md)."""
  if metric in TOKEN_METRICS:
    return 0
  if metric == "smooth_image" and "official_smooth_f32_vs_f64" in result:
    return max(tol, 2 * result["official_smooth_f32_vs_f64"])
  return tol


def failures(results: dict[str, dict[str, float]], tol: float) -> list[str]:
  return [f"{name} {k}" for name, r in results.items() for k, v in r.items()
          if k not in DIAGNOSTIC and v > bound(r, k, tol)]


def table(results: dict[str, dict[str, float]], tol: float) -> str:
  names = list(results)
  metrics = list(dict.fromkeys(k for r in results.values() for k in r))
  lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for metric in metrics:
    fmt = (lambda v: f"{v} differ") if metric in TOKEN_METRICS else (lambda v: f"{v:.1e}")
    cells = [fmt(results[n][metric]) if metric in results[n] else "-" for n in names]
    lines.append(f"| {metric}{' (diagnostic)' if metric in DIAGNOSTIC else ''} | " + " | ".join(cells) + " |")
  failed = failures(results, tol)
  lines.append(f"\n{'PASS' if not failed else 'FAIL: ' + ', '.join(failed)} (tolerance {tol:.0e}; tokens must "
               "match exactly)")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("--official", required=True, help="checkout of the official VAR code (holds models/)")
  parser.add_argument("--torch-python", default=sys.executable, help="a Python interpreter that has torch")
  parser.add_argument("--runs", default="reduced,d16", help=f"comma-separated groups {sorted(RUNS)} or runs")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tol", type=float, default=1e-4)
  parser.add_argument("--json", help="also write the results here")
  parser.add_argument("--official-side", help=argparse.SUPPRESS)  # internal: run name, in the torch interpreter
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.official_side:
    official_side(args.official, _select(args.official_side)[0], args.seed, args.out)
    return
  selected = [run for name in args.runs.split(",") for run in _select(name)]
  if not all(selected):
    parser.error(f"unknown runs in {args.runs!r}; choose from {sorted(RUNS)} or "
                 f"{[r.name for group in RUNS.values() for r in group]}")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_default_matmul_precision", "highest")
  sys.path.insert(0, _REPO)
  results = {}
  for run in selected:
    began = time.time()
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "official.npz")
      subprocess.run([args.torch_python, os.path.abspath(__file__), "--official", args.official,
                      "--official-side", run.name, "--seed", str(args.seed), "--out", path], check=True)
      official_s = time.time() - began
      with np.load(path) as data:
        results[run.name] = our_side(run, data)
    print(f"{run.name} (official {official_s:.0f} s, total {time.time() - began:.0f} s): "
          + "  ".join(f"{k} {v:.1e}" if k not in TOKEN_METRICS else f"{k} {v}" for k, v in results[run.name].items()),
          flush=True)
  print()
  print(table(results, args.tol))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  if failures(results, args.tol):
    sys.exit(1)


if __name__ == "__main__":
  main()

"""Numerical parity of flowar_jax with the official PyTorch FlowAR and MAR KL-16 VAE, on random weights.

  python benchmarks/parity_official.py --official /path/to/FlowAR [--runs reduced,S,L1,H1] [--json OUT]

`--official` is a checkout of the official FlowAR repository (the directory holding `models/flowar.py` and
`models/vae.py`); its modules are imported from there, and torch, timm, einops and scipy are needed
(`pip install flowar_jax[torch] timm einops scipy`). Every parameter (zero-initialised ones included) is
randomised, the official state dict is converted with `flowar_jax.convert`, and both sides compute, in
float32 on the CPU, from the same weights and inputs:

  z           the backbone's per-token output, teacher-forced over all scales in one pass (official: its
              training-mode forward with dropout and label dropout 0, which is the teacher-forced path)
  z_eval      the same z in evaluation mode, scale by scale through the KV cache (official: `eval()` and
              its per-scale `forward_mae_encoder/decoder`, as `sample_tokens` runs them; ours: `cached_step`)
  velocity    the flow head's output for given x_t, t, z (the finest scale)
  loss        the training loss for given per-scale flow times and noise
  sample      a full class-conditional sample with the run's CFG, guidance interval and step count, from the
              same per-scale starting noise; the official ODE state is float64, ours float32
  sample_f32  the same against the official sampler with its ODE state switched to float32 (diagnostic)
  sample_cfg1 cfg = 1 (official: crashes at cfg = 1, so compared with guidance 0, which never guides)
  encode      the VAE posterior mean;  decode: the VAE decoder;  image: the sample decoded
  official_f32_vs_f64  the official sampler with a float32 ODE state against its own float64 one: how much
              float32 rounding alone moves a sample (a measure of the sampler's conditioning, not a check)

The error printed is max|ours - official| / max|official| over the whole output; the check passes when every
error is at most --tol (1e-4). Runs: 'reduced' = three small models (head v1 with FlowAR-S's sampling
settings, head v2 with FlowAR-L's, head v2 with head dim 96 and FlowAR-H's 50-step grid) with a 32-channel
VAE on 64 px; 'S' = FlowAR-S at full size with the real KL-16 VAE on 256 px; 'L1'/'H1' = FlowAR-L/H at full
width with one block per stack and one head block; 'L'/'H' = full size (needs tens of GB of memory).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PRESETS = {"S": "configs/flowar_s.py", "L": "configs/flowar_l.py", "H": "configs/flowar_h.py"}
METRICS = ("z", "z_eval", "velocity", "loss", "sample", "sample_f32", "sample_cfg1", "encode", "decode", "image",
           "official_f32_vs_f64")
_DIAGNOSTIC = ("official_f32_vs_f64",)  # the official code against itself: not a parity check


@dataclasses.dataclass(frozen=True)
class Run:
  """One parity run: a FlowAR shape, the sampling settings of a published preset, and a VAE shape."""
  name: str
  preset: str  # 'S' | 'L' | 'H': sampling settings (and sizes unless overridden)
  width: int | None = None
  depth: int | None = None
  num_heads: int | None = None
  head_variant: str | None = None
  head_depth: int | None = None
  head_width: int | None = None
  vae_channels: int | None = 32  # None: no VAE check; 128: the real KL-16 on 256 px
  batch: int = 2


RUNS = {
    "reduced": (Run("reduced-S", "S", 64, 2, 4, "v1", 2, 128),
                Run("reduced-L", "L", 64, 2, 4, "v2", 2, 128, vae_channels=None),
                Run("reduced-H", "H", 192, 2, 2, "v2", 2, 192, vae_channels=None)),
    "S": (Run("S", "S", vae_channels=128),),
    "L1": (Run("L-1block", "L", depth=1, head_depth=1, vae_channels=None),),
    "H1": (Run("H-1block", "H", depth=1, head_depth=1, vae_channels=None),),
    "L": (Run("L", "L", vae_channels=None),),
    "H": (Run("H", "H", vae_channels=None),),
}


def _select(name: str) -> tuple[Run | None, ...]:
  """A group of runs by its key in RUNS, or one run by its name; (None,) when neither."""
  if name in RUNS:
    return RUNS[name]
  return tuple(r for group in RUNS.values() for r in group if r.name == name) or (None,)


def rel_err(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))


def import_official(path: str):
  """The official `models.flowar` and `models.vae` modules, runnable on the CPU."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.Tensor.cuda = lambda self, *a, **k: self  # the official code moves tensors with .cuda()
  torch.nn.Module.cuda = lambda self, *a, **k: self
  sys.path.insert(0, os.path.abspath(path))
  return importlib.import_module("models.flowar"), importlib.import_module("models.vae")


def randomize(module, seed: int) -> None:
  """Every parameter random (zero-initialised final layers and gates included), at scales that keep
  activations O(1): weights ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1^2), the rest ~ N(0, 0.05^2)."""
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("weight") and p.ndim >= 2 and "class_emb" not in name:
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
      elif name.endswith("weight") and p.ndim == 1:
        p.copy_(1.0 + 0.1 * noise)
      elif "pos_embed" in name or "class_emb" in name:
        p.copy_(0.5 * noise)
      else:
        p.copy_(0.05 * noise)


def state_dict_numpy(module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def our_config(run: Run):
  from flowar_jax.config import config_from_dict  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("preset", os.path.join(_REPO, _PRESETS[run.preset]))
  preset = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(preset)
  config = config_from_dict(preset.get_config().to_dict())
  m = config.model
  for key, value in (("width", run.width), ("depth", run.depth), ("num_heads", run.num_heads)):
    if value is not None:
      m[key] = value
  for key, value in (("variant", run.head_variant), ("depth", run.head_depth), ("width", run.head_width)):
    if value is not None:
      m.head[key] = value
  if run.vae_channels:
    config.vae.base_channels = run.vae_channels
  return config


def official_flowar(flowar_mod, config, seed: int):
  m = config.model
  model = flowar_mod.FlowAR(img_size=256, vae_stride=16, encoder_embed_dim=m.width, encoder_depth=m.depth,
                            encoder_num_heads=m.num_heads, decoder_embed_dim=m.width, decoder_depth=m.depth,
                            decoder_num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, label_drop_prob=0.0,
                            diffloss_d=m.head.depth, diffloss_w=m.head.width, cross=m.head.variant == "v2")
  randomize(model, seed)
  return model


def official_vae(vae_mod, channels: int, seed: int):
  vae = vae_mod.AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))
  if channels != 128:
    vae.encoder = vae_mod.Encoder(ch=channels, ch_mult=(1, 1, 2, 2, 4), z_channels=16)
    vae.decoder = vae_mod.Decoder(ch=channels, ch_mult=(1, 1, 2, 2, 4), z_channels=16)
  randomize(vae, seed)
  return vae.eval()


def _official_sample(theirs, labels, start, *, cfg, guidance, num_steps) -> np.ndarray:
  """Official `sample_tokens` with its per-scale `torch.randn([2B, N, C])` replaced by `start`."""
  import torch  # pylint: disable=g-import-not-at-top
  queue = [torch.from_numpy(a) for a in start]
  randn = torch.randn
  torch.randn = lambda *s, **k: queue.pop(0) if isinstance(s[0], list) else randn(*s, **k)
  try:
    theirs.eval()
    with torch.no_grad():
      tokens = theirs.sample_tokens(num_steps=num_steps, guidance=guidance, cfg=cfg,
                                    labels=torch.from_numpy(labels)).numpy()
  finally:
    torch.randn = randn
  assert not queue, "the official sampler drew a different number of noises"
  return tokens.transpose(0, 2, 3, 1)


class _Float32ODE:
  """Runs the official Euler sampler with a float32 state (as ours) but its float64 time grid (so the same steps
  are guided), to separate the state's precision from everything else."""

  def __init__(self, flowar_mod):
    self.sampler = flowar_mod.sampler

  def __enter__(self):
    import torch  # pylint: disable=g-import-not-at-top

    class Torch32:
      float64 = torch.float32

      @staticmethod
      def linspace(*args, **kwargs):
        return torch.linspace(*args, **{**kwargs, "dtype": torch.float64})

      def __getattr__(self, name):
        return getattr(torch, name)

    self.torch, self.sampler.torch = self.sampler.torch, Torch32()

  def __exit__(self, *exc):
    self.sampler.torch = self.torch


def _official_teacher_forced(theirs, latents, labels, times, noises):
  """Official training-mode forward (the teacher-forced pass) with the flow loss's draws replaced.

  -> (z [B, L, D], loss)."""
  import torch  # pylint: disable=g-import-not-at-top
  batch = latents.shape[0]
  captured = []
  real_loss = theirs.flow_loss_fn

  def capturing_loss(net, gt, z):
    captured.append(z.detach().clone())
    return real_loss(net, gt, z)

  theirs.flow_loss_fn = capturing_loss
  queue_t, queue_eps = [torch.from_numpy(t[:, None, None]) for t in times], [torch.from_numpy(n) for n in noises]
  rand, randn_like = torch.rand, torch.randn_like
  torch.rand = lambda *s, **k: queue_t.pop(0) if s[0] == (batch, 1, 1) else rand(*s, **k)
  torch.randn_like = lambda x, **k: queue_eps.pop(0)
  try:
    theirs.train()
    with torch.no_grad():
      loss = float(theirs(torch.from_numpy(latents), torch.from_numpy(labels)))
  finally:
    torch.rand, torch.randn_like = rand, randn_like
    theirs.flow_loss_fn = real_loss
  assert not queue_t and not queue_eps, "the official loss drew a different number of times / noises"
  return torch.cat(captured, 1).numpy(), loss


def _official_cached_z(theirs, latents, labels) -> np.ndarray:
  """Official evaluation mode, scale by scale through the KV cache, fed the ground-truth next-scale inputs."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  imgs = torch.from_numpy(latents)
  side = imgs.shape[-1]
  scales = theirs.scale
  targets = [F.interpolate(imgs, (s, s), mode="area") for s in scales[:-1]] + [imgs]
  theirs.eval()
  for blk in list(theirs.encoder_blocks) + list(theirs.decoder_blocks):
    blk.attn.clear_cache()
  out = []
  with torch.no_grad():
    class_embedding = theirs.class_emb(torch.from_numpy(labels))
    x, start = class_embedding.unsqueeze(1), 0
    for k, s in enumerate(scales):
      z = theirs.forward_mae_encoder(x, class_embedding, None, start, start + s * s)
      out.append(theirs.forward_mae_decoder(z, class_embedding, None, start, start + s * s))
      start += s * s
      if k + 1 < len(scales):
        nxt = F.interpolate(F.interpolate(targets[k], (side, side), mode="bicubic"), (scales[k + 1],) * 2, mode="area")
        x = theirs.z_proj(theirs.patchify(nxt))
  return torch.cat(out, 1).numpy()


def _our_cached_z(ours, latents, labels):
  """Ours in evaluation mode through `cached_step`, fed the ground-truth next-scale inputs."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flowar_jax.scales import scale_targets, teacher_forcing_inputs  # pylint: disable=g-import-not-at-top
  schedule = ours.schedule
  inputs = teacher_forcing_inputs(scale_targets(latents, schedule), schedule)  # [B, L - 1, C]
  class_embedding = ours.class_embedding(labels)
  tokens, caches, out = class_embedding[:, None], None, []
  for k in range(schedule.num_scales):
    z, caches = ours.backbone.cached_step(k, tokens, class_embedding, caches)
    out.append(z)
    if k + 1 < schedule.num_scales:
      tokens = ours.backbone.z_proj(inputs[:, schedule.offsets[k + 1] - 1:schedule.offsets[k + 2] - 1])
  return jnp.concatenate(out, axis=1)


def check_flowar(flowar_mod, run: Run, seed: int) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
  """-> errors and (our sampled latents, the official ones), both `[B, S, S, C]`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from flowar_jax.convert import flowar_params  # pylint: disable=g-import-not-at-top
  from flowar_jax.models.params import split_params  # pylint: disable=g-import-not-at-top
  from flowar_jax.models.registry import build_model  # pylint: disable=g-import-not-at-top
  from flowar_jax.sampling.sampler import SamplingSettings, sample_latents  # pylint: disable=g-import-not-at-top

  config = our_config(run)
  theirs = official_flowar(flowar_mod, config, seed)
  graphdef, _ = split_params(nnx.eval_shape(lambda: build_model(config)))
  ours = nnx.merge(graphdef, flowar_params(config, state_dict_numpy(theirs)))
  rng = np.random.default_rng(seed)
  batch, scales = run.batch, list(config.model.scales)
  side, c = scales[-1], config.vae.latent_channels
  latents = rng.standard_normal((batch, c, side, side)).astype(np.float32)
  labels = np.arange(1, batch + 1) * 7 % 1000
  times = [rng.uniform(size=batch).astype(np.float32) for _ in scales]
  noises = [rng.standard_normal((batch, s * s, c)).astype(np.float32) for s in scales]
  out = {}

  z_theirs, loss_theirs = _official_teacher_forced(theirs, latents, labels, times, noises)
  lat, lab = jnp.asarray(latents.transpose(0, 2, 3, 1)), jnp.asarray(labels)
  z_ours, targets = ours.teacher_forced_z(lat, lab)
  out["z"] = rel_err(z_ours, z_theirs)
  out["z_eval"] = rel_err(_our_cached_z(ours, lat, lab), _official_cached_z(theirs, latents, labels))
  loss_ours, _ = ours.flow_matching_loss(z_ours, targets, [jnp.asarray(t) for t in times],
                                         [jnp.asarray(n) for n in noises])
  out["loss"] = rel_err(loss_ours, loss_theirs)

  n = side * side
  x = rng.standard_normal((batch, n, c)).astype(np.float32)
  t = rng.uniform(size=batch).astype(np.float32)
  cond = rng.standard_normal((batch, n, config.model.width)).astype(np.float32)
  with torch.no_grad():
    v_theirs = theirs.flownet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(cond)).numpy()
  out["velocity"] = rel_err(ours.flownet(jnp.asarray(x), jnp.asarray(t), jnp.asarray(cond)), v_theirs)

  s = config.sampling
  start = [rng.standard_normal((2 * batch, k * k, c)).astype(np.float32) for k in scales]
  ours_noise = [jnp.asarray(a[:batch]) for a in start]  # the official conditional half
  fn = jax.jit(lambda model, noise, settings: sample_latents(model, lab, None, settings, noise=noise),
               static_argnums=2)
  published = SamplingSettings(cfg=s.cfg, guidance=s.guidance, num_steps=s.num_steps)
  sample = np.asarray(fn(ours, ours_noise, published))
  tokens = _official_sample(theirs, labels, start, cfg=s.cfg, guidance=s.guidance, num_steps=s.num_steps)
  out["sample"] = rel_err(sample, tokens)
  with _Float32ODE(flowar_mod):
    tokens_f32 = _official_sample(theirs, labels, start, cfg=s.cfg, guidance=s.guidance, num_steps=s.num_steps)
  out["sample_f32"] = rel_err(sample, tokens_f32)
  out["official_f32_vs_f64"] = rel_err(tokens_f32, tokens)
  try:
    _official_sample(theirs, labels, [a[:batch] for a in start], cfg=1.0, guidance=s.guidance, num_steps=s.num_steps)
    raise AssertionError("the official sampler no longer fails at cfg = 1: compare at cfg = 1 directly")
  except (NameError, UnboundLocalError):
    pass
  conditional = _official_sample(theirs, labels, start, cfg=s.cfg, guidance=0.0, num_steps=s.num_steps)
  no_cfg = SamplingSettings(cfg=1.0, guidance=s.guidance, num_steps=s.num_steps)
  out["sample_cfg1"] = rel_err(fn(ours, ours_noise, no_cfg), conditional)
  return out, (sample, tokens)


def check_vae(vae_mod, run: Run, seed: int, sampled=None) -> dict[str, float]:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from flowar_jax.convert import vae_params  # pylint: disable=g-import-not-at-top
  from flowar_jax.models.params import split_params  # pylint: disable=g-import-not-at-top
  from flowar_jax.models.registry import build_vae  # pylint: disable=g-import-not-at-top

  config = our_config(run)
  theirs = official_vae(vae_mod, run.vae_channels, seed)
  graphdef, _ = split_params(nnx.eval_shape(lambda: build_vae(config)))
  ours = nnx.merge(graphdef, vae_params(config, state_dict_numpy(theirs))["vae"])
  rng = np.random.default_rng(seed)
  image_side = 256 if run.vae_channels == 128 else 64
  images = rng.uniform(-1, 1, (run.batch, 3, image_side, image_side)).astype(np.float32)
  z = rng.standard_normal((run.batch, 16, image_side // 16, image_side // 16)).astype(np.float32)
  out = {}
  with torch.no_grad():
    mean = theirs.encode(torch.from_numpy(images)).mean.numpy()
    dec = theirs.decode(torch.from_numpy(z)).numpy()
  out["encode"] = rel_err(ours.encode(jnp.asarray(images.transpose(0, 2, 3, 1))).mean, mean.transpose(0, 2, 3, 1))
  out["decode"] = rel_err(ours.decode(jnp.asarray(z.transpose(0, 2, 3, 1))), dec.transpose(0, 2, 3, 1))
  if sampled is not None:  # the sampled latents, decoded as the official evaluation does
    ours_lat, theirs_lat = sampled
    scale = config.vae.latent_scale
    with torch.no_grad():
      img = theirs.decode(torch.from_numpy(theirs_lat.transpose(0, 3, 1, 2)) / scale).numpy()
    out["image"] = rel_err(ours.decode(jnp.asarray(ours_lat) / scale), img.transpose(0, 2, 3, 1))
  return out


def _worst(results: dict[str, dict[str, float]]) -> float:
  return max(v for r in results.values() for k, v in r.items() if k not in _DIAGNOSTIC)


def table(results: dict[str, dict[str, float]], tol: float) -> str:
  """Markdown table: one row per metric, one column per run; '-' where a run has no such check."""
  names = list(results)
  lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for metric in METRICS:
    if not any(metric in r for r in results.values()):
      continue
    cells = [f"{results[n][metric]:.1e}" if metric in results[n] else "-" for n in names]
    lines.append(f"| {metric} | " + " | ".join(cells) + " |")
  worst = _worst(results)
  lines.append(f"\nmax relative error {worst:.1e}: {'PASS' if worst <= tol else 'FAIL'} (tolerance {tol:.0e})")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("--official", required=True, help="checkout of the official FlowAR code (holds models/)")
  parser.add_argument("--runs", default="reduced,S", help=f"comma-separated groups {sorted(RUNS)} or single runs "
                      "('reduced-S', 'H-1block', ...)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tol", type=float, default=1e-4)
  parser.add_argument("--json", help="also write the errors here")
  args = parser.parse_args()
  selected = [run for name in args.runs.split(",") for run in _select(name)]
  if not all(selected):
    parser.error(f"unknown runs in {args.runs!r}; choose from {sorted(RUNS)} or the single runs "
                 f"{[r.name for group in RUNS.values() for r in group]}")
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_default_matmul_precision", "highest")
  torch.backends.cuda.matmul.allow_tf32 = False
  sys.path.insert(0, _REPO)
  flowar_mod, vae_mod = import_official(args.official)
  results = {}
  for run in selected:
    began = time.time()
    res, sampled = check_flowar(flowar_mod, run, args.seed)
    if run.vae_channels:
      res.update(check_vae(vae_mod, run, args.seed, sampled))
    results[run.name] = res
    print(f"{run.name} ({time.time() - began:.0f} s): " + "  ".join(f"{k} {v:.1e}" for k, v in res.items()),
          flush=True)
  print()
  print(table(results, args.tol))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  if _worst(results) > args.tol:
    sys.exit(1)


if __name__ == "__main__":
  main()

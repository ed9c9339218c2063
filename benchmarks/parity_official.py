"""Numerical parity of flowar_jax with the official PyTorch FlowAR and MAR KL-16 VAE, on random weights.

  python benchmarks/parity_official.py --official /path/to/FlowAR [--size reduced|S|L|H|all] [--json OUT]

`--official` is a checkout of the official FlowAR repository (the directory holding `models/flowar.py` and
`models/vae.py`); its modules are imported from there, and torch is needed (`pip install flowar_jax[torch]`).
Every parameter (zero-initialised ones included) is randomised, the official state dict is converted with
`flowar_jax.convert`, and both sides compute, in float32 on the CPU:

  z         the backbone's per-token output, teacher-forced (official: train mode, dropouts and label drop 0,
            because its eval-mode attention takes the KV-cache branch)
  velocity  the flow head's output for given x_t, t, z (the finest scale)
  loss      the training loss for given per-scale flow times and noise
  encode    the VAE posterior mean;  decode  the VAE decoder
  sample    a full class-conditional sample (with CFG) given the same per-scale starting noise; the
            official ODE state is float64, ours float32
  image     that sample decoded by the VAE

The error printed is max|ours - official| / max|official| over the whole output.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys

import numpy as np

_SIZES = {  # official constructor, its diffloss_d and diffloss_w (from the official README), our preset
    "S": ("flowar_small", 2, 1024, "configs/flowar_s.py"),
    "L": ("flowar_large", 12, 1024, "configs/flowar_l.py"),
    "H": ("flowar_huge", 12, 1536, "configs/flowar_h.py"),
}
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def our_config(size: str, variant: str):
  from flowar_jax.config import config_from_dict  # pylint: disable=g-import-not-at-top
  path = os.path.join(_REPO, _SIZES["S" if size == "reduced" else size][3])
  spec = importlib.util.spec_from_file_location("preset", path)
  preset = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(preset)
  config = config_from_dict(preset.get_config().to_dict())
  if size == "reduced":
    m = config.model
    m.width, m.depth, m.num_heads = 64, 2, 4
    m.head.variant, m.head.width, m.head.depth = variant, 128, 2
    config.vae.base_channels = 32
  return config


def official_flowar(flowar_mod, size: str, variant: str, seed: int):
  if size == "reduced":
    model = flowar_mod.FlowAR(img_size=256, vae_stride=16, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
                              decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, label_drop_prob=0.0,
                              diffloss_d=2, diffloss_w=128, cross=variant == "v2")
  else:
    ctor, d, w, _ = _SIZES[size]
    model = getattr(flowar_mod, ctor)(img_size=256, vae_stride=16, label_drop_prob=0.0, diffloss_d=d, diffloss_w=w)
    for blk in list(model.encoder_blocks) + list(model.decoder_blocks):
      blk.use_checkpoint = False
  randomize(model, seed)
  return model


def official_vae(vae_mod, size: str, seed: int):
  vae = vae_mod.AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))
  if size == "reduced":
    vae.encoder = vae_mod.Encoder(ch=32, ch_mult=(1, 1, 2, 2, 4), z_channels=16)
    vae.decoder = vae_mod.Decoder(ch=32, ch_mult=(1, 1, 2, 2, 4), z_channels=16)
  randomize(vae, seed)
  return vae.eval()


def _official_sample(flowar_mod, theirs, settings, labels, start) -> np.ndarray:
  """Official `sample_tokens` with its per-scale `torch.randn([2B, N, C])` replaced by `start`."""
  import torch  # pylint: disable=g-import-not-at-top
  queue = [torch.from_numpy(a) for a in start]
  randn = torch.randn
  torch.randn = lambda *s, **k: queue.pop(0) if isinstance(s[0], list) else randn(*s, **k)
  try:
    theirs.eval()
    with torch.no_grad():
      tokens = theirs.sample_tokens(num_steps=settings.num_steps, guidance=settings.guidance, cfg=settings.cfg,
                                    labels=torch.from_numpy(labels)).numpy()
  finally:
    torch.randn = randn
  assert not queue, "the official sampler drew a different number of noises"
  return tokens


class _float32_ode:  # pylint: disable=invalid-name
  """Runs the official Euler sampler with a float32 state (as ours), to separate precision from logic."""

  def __init__(self, flowar_mod):
    self.sampler = flowar_mod.sampler

  def __enter__(self):
    import torch  # pylint: disable=g-import-not-at-top

    class Torch32:
      float64 = torch.float32

      def __getattr__(self, name):
        return getattr(torch, name)

    self.torch, self.sampler.torch = self.sampler.torch, Torch32()

  def __exit__(self, *exc):
    self.sampler.torch = self.torch


def check_flowar(flowar_mod, size: str, variant: str, seed: int, batch: int = 2) -> dict[str, float]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from flowar_jax.convert import flowar_params  # pylint: disable=g-import-not-at-top
  from flowar_jax.sampling.sampler import SamplingSettings, sample_latents  # pylint: disable=g-import-not-at-top
  from flowar_jax.training.builders import build_flowar  # pylint: disable=g-import-not-at-top
  from flowar_jax.training.state import split_params  # pylint: disable=g-import-not-at-top

  config = our_config(size, variant)
  theirs = official_flowar(flowar_mod, size, variant, seed)
  graphdef, _ = split_params(nnx.eval_shape(lambda: build_flowar(config)))
  ours = nnx.merge(graphdef, flowar_params(config, state_dict_numpy(theirs)))
  rng = np.random.default_rng(seed)
  scales = list(config.model.scales)
  side, c = scales[-1], config.vae.latent_channels
  latents = rng.standard_normal((batch, c, side, side)).astype(np.float32)
  labels = np.arange(batch) * 7 % 1000
  times = [rng.uniform(size=batch).astype(np.float32) for _ in scales]
  noises = [rng.standard_normal((batch, s * s, c)).astype(np.float32) for s in scales]
  out = {}

  # z and the loss, teacher-forced: one official forward with the flow loss's random draws replaced.
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
      loss_theirs = float(theirs(torch.from_numpy(latents), torch.from_numpy(labels)))
  finally:
    torch.rand, torch.randn_like = rand, randn_like
    theirs.flow_loss_fn = real_loss
  assert not queue_t and not queue_eps, "the official loss drew a different number of times / noises"
  z_theirs = torch.cat(captured, 1).numpy()
  lat = jnp.asarray(latents.transpose(0, 2, 3, 1))
  z_ours, targets = ours.teacher_forced_z(lat, jnp.asarray(labels))
  out["z"] = rel_err(z_ours, z_theirs)
  loss_ours, _ = ours.flow_matching_loss(z_ours, targets, [jnp.asarray(t) for t in times],
                                         [jnp.asarray(n) for n in noises])
  out["loss"] = rel_err(loss_ours, loss_theirs)

  # The head's velocity at the finest scale.
  n = side * side
  x = rng.standard_normal((batch, n, c)).astype(np.float32)
  t = rng.uniform(size=batch).astype(np.float32)
  cond = rng.standard_normal((batch, n, config.model.width)).astype(np.float32)
  with torch.no_grad():
    v_theirs = theirs.flownet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(cond)).numpy()
  out["velocity"] = rel_err(ours.flownet(jnp.asarray(x), jnp.asarray(t), jnp.asarray(cond)), v_theirs)

  # A full sample with CFG and the published settings, from the same per-scale noise.
  settings = SamplingSettings(cfg=config.sampling.cfg, guidance=config.sampling.guidance,
                              num_steps=config.sampling.num_steps)
  start = [rng.standard_normal((2 * batch, s * s, c)).astype(np.float32) for s in scales]
  tokens = _official_sample(flowar_mod, theirs, settings, labels, start)
  with _float32_ode(flowar_mod):
    tokens_f32 = _official_sample(flowar_mod, theirs, settings, labels, start)
  fn = jax.jit(lambda model, lab, noise: sample_latents(model, lab, None, settings, noise=noise))
  sample = fn(ours, jnp.asarray(labels), [jnp.asarray(a[:batch]) for a in start])
  out["sample"] = rel_err(sample, tokens.transpose(0, 2, 3, 1))
  out["sample_vs_f32_ode"] = rel_err(sample, tokens_f32.transpose(0, 2, 3, 1))
  out["_sample_latents"] = (np.asarray(sample), tokens)
  return out


def check_vae(vae_mod, size: str, seed: int, latents_pair=None, batch: int = 2) -> dict[str, float]:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from flowar_jax.convert import vae_params  # pylint: disable=g-import-not-at-top
  from flowar_jax.training.builders import build_vae  # pylint: disable=g-import-not-at-top
  from flowar_jax.training.state import split_params  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  config = our_config(size, "v1")
  theirs = official_vae(vae_mod, size, seed)
  graphdef, _ = split_params(nnx.eval_shape(lambda: build_vae(config)))
  ours = nnx.merge(graphdef, vae_params(config, state_dict_numpy(theirs))["vae"])
  rng = np.random.default_rng(seed)
  image_side = 64 if size == "reduced" else 256
  images = rng.uniform(-1, 1, (batch, 3, image_side, image_side)).astype(np.float32)
  z = rng.standard_normal((batch, 16, image_side // 16, image_side // 16)).astype(np.float32)
  out = {}
  with torch.no_grad():
    mean = theirs.encode(torch.from_numpy(images)).mean.numpy()
    dec = theirs.decode(torch.from_numpy(z)).numpy()
  out["encode"] = rel_err(ours.encode(jnp.asarray(images.transpose(0, 2, 3, 1))).mean, mean.transpose(0, 2, 3, 1))
  out["decode"] = rel_err(ours.decode(jnp.asarray(z.transpose(0, 2, 3, 1))), dec.transpose(0, 2, 3, 1))
  if latents_pair is not None:  # the sampled latents, decoded as the official evaluation does
    ours_lat, theirs_tok = latents_pair
    scale = config.vae.latent_scale
    with torch.no_grad():
      img = theirs.decode(torch.from_numpy(theirs_tok) / scale).numpy()
    out["image"] = rel_err(ours.decode(jnp.asarray(ours_lat) / scale), img.transpose(0, 2, 3, 1))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--official", required=True, help="checkout of the official FlowAR code (holds models/)")
  parser.add_argument("--size", default="all", choices=["reduced", "S", "L", "H", "all"],
                      help="'all' = reduced (head v1 and v2) and S")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", help="also write the errors here")
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_default_matmul_precision", "highest")
  sys.path.insert(0, _REPO)
  flowar_mod, vae_mod = import_official(args.official)
  runs = {"all": [("reduced", "v1"), ("reduced", "v2"), ("S", "v1")], "reduced": [("reduced", "v1"), ("reduced", "v2")],
          "S": [("S", "v1")], "L": [("L", "v2")], "H": [("H", "v2")]}[args.size]
  results = {}
  for size, variant in runs:
    res = check_flowar(flowar_mod, size, variant, args.seed)
    pair = res.pop("_sample_latents")
    res.update(check_vae(vae_mod, size, args.seed, pair))
    results[f"{size}/{variant}"] = res
    print(f"{size:>8} head {variant}: " + "  ".join(f"{k} {v:.2e}" for k, v in res.items()), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()

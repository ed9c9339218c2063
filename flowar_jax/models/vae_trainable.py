"""What the VAE stage trains and checkpoints: the autoencoder, and its patch discriminator when one is used."""
from __future__ import annotations

import ml_collections
from flax import nnx

from flowar_jax.models.discriminator import PatchDiscriminator
from flowar_jax.models.vae import AutoencoderKL


class VAETrainable(nnx.Module):
  """What the VAE stage trains: the autoencoder, and its discriminator when `disc_weight > 0`."""

  def __init__(self, config: ml_collections.ConfigDict, seed: int = 0):
    rngs = nnx.Rngs(seed)
    self.vae = AutoencoderKL(config.vae, rngs=rngs)
    train = config.vae.train
    self.disc = (PatchDiscriminator(config.vae.in_channels, train.disc_channels, train.disc_layers, rngs=rngs)
                 if train.disc_weight > 0 else None)

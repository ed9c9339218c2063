"""What VAR's tokenizer stage trains and checkpoints: the multi-scale VQVAE, under the attribute name the KL
VAE's stage uses (`vae`), so both families' tokenizer checkpoints have one layout."""
from __future__ import annotations

from flax import nnx

from flowar_jax.tokenizers.msvq import MultiScaleVQVAE


class VQTrainable(nnx.Module):

  def __init__(self, vqvae: MultiScaleVQVAE):
    self.vae = vqvae

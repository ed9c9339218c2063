"""VAR-d16 on ImageNet 256 over the `vae_ch160v4096z32` multi-scale VQVAE (310.28M + 108.95M parameters), with
the official FID sampling settings (see docs/var.md)."""
from flowar_jax.config_var import var_preset


def get_config():
  return var_preset(16)

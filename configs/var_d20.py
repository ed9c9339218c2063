"""VAR-d20 on ImageNet 256 over the `vae_ch160v4096z32` multi-scale VQVAE (model, tokenizer and sampling
sections; see docs/var.md). Load with `flowar_jax.config_files.load_config("configs/var_d20.py")`."""
from flowar_jax.models.var_presets import var_config


def get_config():
  return var_config(20)

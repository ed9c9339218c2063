"""A tiny VAR for the bundled 8x8 digits upscaled to 16x16: a stride-4 multi-scale VQVAE (64 codes of width
8, scales 1, 2, 3, 4) and a depth-2 VAR (width 128, 2 heads). Sizes only: training is not wired to VAR yet."""
from flowar_jax.models.var_presets import var_config


def get_config():
  c = var_config(2)
  c.data.name, c.data.image_size, c.data.num_classes = "digits", 16, 10
  c.tokenizer.update(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                     patch_nums=(1, 2, 3, 4))
  c.model.update(num_classes=10, vocab_size=64, cvae=8, patch_nums=(1, 2, 3, 4), drop_path_rate=0.0)
  c.sampling.update(cfg=1.5, top_k=32, top_p=0.96)
  return c

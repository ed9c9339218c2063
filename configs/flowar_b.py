"""FlowAR-B (about 300M, the paper's size; the official code ships no B definition, so the shape here is
FlowAR-S deepened to 12 + 12 blocks, and its sampling settings are untuned)."""
from flowar_jax.config import imagenet_preset


def get_config():
  return imagenet_preset(width=768, depth=12, num_heads=12, head_variant="v1", head_depth=2, head_width=1024,
                         cfg=3.5, guidance=0.9, num_steps=25)

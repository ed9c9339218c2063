"""FlowAR-L (586.86M) on ImageNet 256, flow head v2 with cross-attention."""
from flowar_jax.config import imagenet_preset


def get_config():
  return imagenet_preset(width=1024, depth=8, num_heads=16, head_variant="v2", head_depth=12, head_width=1024,
                         cfg=2.4, guidance=0.9, num_steps=25)

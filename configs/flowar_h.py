"""FlowAR-H (1913.32M) on ImageNet 256, flow head v2 with cross-attention, head dim 96 in the backbone."""
from flowar_jax.config import imagenet_preset


def get_config():
  return imagenet_preset(width=1536, depth=15, num_heads=16, head_variant="v2", head_depth=12, head_width=1536,
                         cfg=2.4, guidance=0.7, num_steps=50)

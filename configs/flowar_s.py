"""FlowAR-S (171.72M) on ImageNet 256: `python -m flowar_jax train --config configs/flowar_s.py --workdir W
--config.data.data_dir=/path/to/imagenet --config.vae_checkpoint=/path/to/vae`."""
from flowar_jax.config import imagenet_preset


def get_config():
  return imagenet_preset(width=768, depth=6, num_heads=12, head_variant="v1", head_depth=2, head_width=1024,
                         cfg=4.3, guidance=0.9, num_steps=25)

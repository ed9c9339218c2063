"""FlowAR-S sized text-to-image: the FlowAR-S backbone and flow head, conditioned on CLIP ViT-L/14's text
transformer (77 tokens of width 768, pooled 768), on a captioned image folder at 256 px.

  python -m flowar_jax summary --config configs/flowar_s_text.py
  python -m flowar_jax compile --config configs/flowar_s_text.py --topology v5p:2x2x1
  python -m flowar_jax train --config configs/flowar_s_text.py --workdir W --config.data.data_dir=/captioned \\
      --config.text.weights=/path/to/clip-vit-large-patch14 --config.vae_checkpoint=/path/to/vae

The encoder's weights are 'random' by default (summary, compile, tests): a run points `text.weights` at a
Hugging Face CLIP folder (its tokenizer.json beside it). Each backbone block cross-attends to the prompt.
"""
from flowar_jax.config import imagenet_preset
from flowar_jax.config_text import add_text_section


def get_config():
  c = imagenet_preset(width=768, depth=6, num_heads=12, head_variant="v1", head_depth=2, head_width=1024,
                      cfg=4.3, guidance=0.9, num_steps=25)
  add_text_section(c, "clip")
  c.text.weights = "random"
  c.text.clip_size = "L/14"
  c.text.max_length = 77
  c.text.drop_prob = 0.1
  c.data.name = "captioned_folder"
  c.data.random_flip = False  # a mirrored image contradicts a caption that says left or right
  c.eval.metrics = ("fid",)
  return c

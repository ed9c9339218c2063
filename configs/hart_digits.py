"""A tiny HART for the bundled digits (1,797 real 8x8 images, 10 classes), trained end to end on a CPU in
minutes, as the FlowAR default (configs/digits.py) and VAR's (configs/var_digits.py) are:

  python -m flowar_jax train --config configs/hart_digits.py --workdir runs/hart_digits

Images are upscaled to 16x16 RGB. The tokenizer has var_digits' sizes (a stride-4 multi-scale VQ, 64 codes of
width 8, scales 1, 2, 3, 4) with HART's continuous residual at the last scale; the transformer has VAR's sizes
(depth 2, width 128, 2 heads) with HART's blocks, and its residual head is an MLP of width 128 and depth 2.
"""
from flowar_jax.config_hart import hart_preset


def get_config():
  c = hart_preset(2)
  c.stage = "both"
  c.batch_size = 64
  c.num_train_steps = 1600
  c.checkpoint_every_steps = 500
  c.log_every_steps = 100
  c.sample_every_steps = 400

  c.data.name = "digits"
  c.data.image_size = 16
  c.data.resize_size = 0
  c.data.random_crop = False
  c.data.random_flip = False  # a mirrored digit is another glyph
  c.data.eval_fraction = 0.1

  c.vae.update(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 3, 4))
  c.vae.train.batch_size = 64
  c.vae.train.num_train_steps = 500
  c.vae.train.learning_rate = 2e-3
  c.vae.train.warmup_steps = 100

  c.model.update(num_classes=10, width=128, num_heads=2)
  c.model.residual.update(width=128, depth=2)

  c.optimizer.base_lr = 4e-3  # lr 1e-3 at batch 64
  c.optimizer.min_lr = 1e-5
  c.optimizer.warmup_steps = 200
  c.optimizer.ema_decay = 0.995

  c.sampling.update(cfg=3.0, top_k=0, top_p=0.0, num_samples=100, batch_size=100)

  c.eval.metrics = ("digits",)
  c.eval.num_samples = 1000
  c.eval.train_num_samples = 200
  return c

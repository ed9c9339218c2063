"""AdamW with the official recipe: linear warmup, cosine to min_lr, global-norm clipping, and no weight
decay on biases and other 1-D parameters."""
from __future__ import annotations

import jax
import optax


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float) -> optax.Schedule:
  """Linear 0 -> peak over warmup_steps, then half-cosine peak -> min_lr at total_steps."""
  warmup_steps = max(0, min(warmup_steps, total_steps))
  warmup = optax.linear_schedule(0.0, peak_lr, max(warmup_steps, 1))
  cosine = optax.cosine_decay_schedule(peak_lr, max(total_steps - warmup_steps, 1),
                                       alpha=min_lr / peak_lr if peak_lr else 0.0)
  return optax.join_schedules([warmup, cosine], [warmup_steps])


def decay_mask(params) -> object:
  """True where weight decay applies: parameters with two or more dimensions."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def adamw(schedule: optax.Schedule, *, b1: float, b2: float, weight_decay: float,
          grad_clip: float) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip and grad_clip > 0 else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def flowar_optimizer(opt_config, batch_size: int, num_train_steps: int) -> tuple[optax.GradientTransformation,
                                                                                   optax.Schedule]:
  """From `config.optimizer`: lr = base_lr * batch_size / 256."""
  peak = opt_config.base_lr * batch_size / 256
  schedule = warmup_cosine(peak, opt_config.warmup_steps, num_train_steps, opt_config.min_lr)
  tx = adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, weight_decay=opt_config.weight_decay,
             grad_clip=opt_config.grad_clip)
  return tx, schedule

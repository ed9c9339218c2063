"""Analytic model FLOPs of FlowAR training and sampling: what the model must compute, whatever the compiler adds.

Counted: every matmul with a weight (2 FLOPs per multiply-add) at the tokens it runs on, and attention's
scores and weighted values over the pairs the masks let through (the backbone's scale-causal pairs, the
flow head's all-pairs within one scale). Not counted: elementwise work (norms, activations, softmax), the
frozen VAE encoder, and recomputation by rematerialisation. A training step is 3 forward passes
(forward, and a backward pass of twice the forward's matmuls), as in the usual model-FLOPs utilisation.
"""
from __future__ import annotations

import ml_collections

from flowar_jax.models.flow_head import TIME_FREQUENCY_DIM
from flowar_jax.models.layers import mlp_hidden
from flowar_jax.models.time_grid import time_grid
from flowar_jax.scales import ScaleSchedule


def _backbone_forward(model: ml_collections.ConfigDict, latent_channels: int) -> int:
  schedule = ScaleSchedule(tuple(model.scales))
  length, d = schedule.num_tokens, model.width
  # Each query of scale k sees every token of scales 0..k.
  visible_pairs = sum(n * schedule.offsets[k + 1] for k, n in enumerate(schedule.lengths))
  per_token_block = 3 * d * d + d * d + 3 * d * mlp_hidden(d, model.mlp_ratio)  # qkv, proj, gated MLP
  per_block = 2 * length * per_token_block + 2 * 6 * d * d + 4 * d * visible_pairs  # + adaLN per example
  embed = 2 * (length - 1) * latent_channels * d + 2 * length * d * d  # z_proj, decoder_embed
  return 2 * model.depth * per_block + embed


def _head_condition(model: ml_collections.ConfigDict, side: int) -> int:
  """The condition embedding of one scale (computed once per scale when sampling)."""
  return 2 * side * side * model.width * model.head.width


def _head_velocity(model: ml_collections.ConfigDict, latent_channels: int, side: int) -> int:
  """One velocity evaluation at one scale, given the condition embedding."""
  head, d, c, n = model.head, model.width, latent_channels, side * side
  w, hidden = head.width, mlp_hidden(head.width, head.mlp_ratio)
  total = 2 * n * c * w + 2 * (TIME_FREQUENCY_DIM * w + w * w)  # input and time embeddings
  if head.variant == "v1":  # self-attention, gated MLP, per-token adaLN (6W)
    per_block = 2 * n * (4 * w * w + 3 * w * hidden + 6 * w * w) + 4 * w * n * n
  else:  # self- and cross-attention (kv from z), gated MLP, per-token adaLN (3W), per-example adaLN (3W)
    per_block = (2 * n * (4 * w * w + 2 * w * w + 2 * d * w + 3 * w * hidden + 3 * w * w) + 2 * 3 * w * w
                 + 2 * 4 * w * n * n)
  return total + head.depth * per_block + 2 * n * (2 * w * w + w * c)  # + final adaLN and projection


def _head_forward(model: ml_collections.ConfigDict, latent_channels: int) -> int:
  return sum(_head_condition(model, side) + _head_velocity(model, latent_channels, side) for side in model.scales)


def _text_forward(config: ml_collections.ConfigDict) -> int:
  """A text model's prompt projections and every backbone block's cross-attention to the T prompt tokens (0
  for a class model); the frozen encoder is not counted."""
  if config.model.get("conditioning", "class") != "text":
    return 0
  from flowar_jax.config_text import encoder_widths  # pylint: disable=g-import-not-at-top
  model, t = config.model, config.text.max_length
  states_width, pooled_width = encoder_widths(config.text)
  length, d = ScaleSchedule(tuple(model.scales)).num_tokens, model.width
  projections = 2 * t * states_width * d + 2 * pooled_width * d + 2 * d * d
  per_block = 2 * length * 2 * d * d + 2 * t * 2 * d * d + 4 * d * length * t  # q and out, k|v, attention
  return projections + 2 * model.depth * per_block


def forward_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """Matmul FLOPs of one teacher-forced forward pass (backbone over all scales, head once per scale)."""
  return (_backbone_forward(config.model, config.vae.latent_channels)
          + _head_forward(config.model, config.vae.latent_channels) + _text_forward(config))


def training_flops_per_step(config: ml_collections.ConfigDict, batch_size: int | None = None) -> int:
  """Model FLOPs of one FlowAR training step at `batch_size` (default `config.batch_size`): 3 x forward."""
  return 3 * forward_flops_per_example(config) * (config.batch_size if batch_size is None else batch_size)


def sampling_flops_per_image(config: ml_collections.ConfigDict, settings) -> int:
  """Model FLOPs of sampling one image with `settings` (`SamplingSettings`): the KV-cached backbone pass
  (over both CFG branches when guided), then per scale the condition embeddings and one velocity
  evaluation per branch per ODE stage (two stages per Heun step, except a step that ends at t = 0)."""
  model, c = config.model, config.vae.latent_channels
  guided_run = settings.cfg != 1.0
  total = _backbone_forward(model, c) * (2 if guided_run else 1)
  for k, side in enumerate(model.scales):
    cfg_k = settings.cfg_at(k, len(model.scales))
    branches_at = lambda t_cur: 2 if guided_run and cfg_k != 1.0 and t_cur <= settings.guidance else 1
    total += _head_condition(model, side) * (2 if guided_run and cfg_k != 1.0 else 1)
    grid = time_grid(settings.steps_at(k, len(model.scales)))
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
      stages = 2 if settings.solver == "heun" and t_next > 0 else 1
      total += stages * branches_at(t_cur) * _head_velocity(model, c, side)
  return total

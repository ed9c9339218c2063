"""HART's class-conditional sampler: VAR's KV-cached scale loop with the categorical head, then the residual
head at the last scale (the official `autoregressive_infer_cfg` with its default `num_maskgit_iters=1`).

As the official sampler:
- scales 0 .. K-1 run one KV-cached pass each, conditional and unconditional rows together (2B), and draw
  their codes from the guided logits (1 + t) cond - t uncond with top-k / top-p (`heads.categorical`);
- t = cfg * si / (K - 1) for scales 0 .. K-2. At the last scale the official code reuses the ratio left from
  the loop, (K - 2) / (K - 1), for the logits and for the residual head alike; so does this sampler;
- with one MaskGIT iteration (the official default, which its sampling script keeps), the last scale is one
  pass over all its tokens; the residual head then denoises every token, conditioned on
  decoder_norm(h + word_embed(embed(idx))) of both row halves with the sampled codes idx, and guided with
  eps = (1 + g) eps_c - g eps_u at g = residual_cfg * (K - 2) / (K - 1) (no guidance when g == 1);
- the last scale's code map plus the residual is added to f_hat as is (no phi).
With `config.model.residual.kind = 'flow'` the residual comes from `FlowResidualHead` instead, at the same
guidance weight (`head_settings`).

Differences: the official sampler hard-codes top-k 600 (300 from the 8th scale on) and top-p 0; here they
are settings. Its several-iteration MaskGIT option (`num_maskgit_iters > 1`) is not implemented.
"""
from __future__ import annotations

import dataclasses
import math
import typing

import jax
import jax.numpy as jnp

from flowar_jax.heads.categorical import CategoricalHead, CategoricalSampling
from flowar_jax.heads.diffusion_schedule import TRAIN_STEPS
from flowar_jax.heads.flow_sampling import SamplingSettings
from flowar_jax.heads.residual import ResidualHead, ResidualSampling
from flowar_jax.heads.residual_flow import FlowResidualHead


@dataclasses.dataclass(frozen=True)
class HARTSampling:
  """HART's sampling settings.

  categorical: the codes' settings (cfg at the last scale, top-k, top-p, more_smooth); the official sampler's
    defaults are cfg 1.5 (its script: 4.5), top-k 600 and top-p 0.
  residual_cfg: the residual head's guidance scale (None: the categorical cfg, as the official sampler);
  residual_temperature: of the head's per-step noise (official 1.0);
  residual_steps: the residual head's sampling steps, respaced diffusion or flow Euler steps (None: the head's
    own, HART's 8).
  """
  categorical: CategoricalSampling = CategoricalSampling(cfg=1.5, top_k=600, top_p=0.0)
  residual_cfg: float | None = None
  residual_temperature: float = 1.0
  residual_steps: int | None = None

  def __post_init__(self):
    if not isinstance(self.categorical, CategoricalSampling):
      raise ValueError(f"categorical must be a CategoricalSampling, got {type(self.categorical).__name__}")
    if self.residual_cfg is not None and not (math.isfinite(self.residual_cfg) and self.residual_cfg >= 0):
      raise ValueError(f"residual_cfg must be a finite number >= 0 (or None), got {self.residual_cfg}")
    if not (math.isfinite(self.residual_temperature) and self.residual_temperature >= 0):
      raise ValueError(f"residual_temperature must be a finite number >= 0, got {self.residual_temperature}")
    if self.residual_steps is not None and not (isinstance(self.residual_steps, int)
                                                and 1 <= self.residual_steps <= TRAIN_STEPS):
      raise ValueError(f"residual_steps must be an int in [1, {TRAIN_STEPS}] (or None), got {self.residual_steps!r}")

  @property
  def compute_dtype(self) -> str:
    """The matrix products' dtype while sampling (the categorical settings')."""
    return self.categorical.compute_dtype

  def residual(self) -> ResidualSampling:
    cfg = self.categorical.cfg if self.residual_cfg is None else self.residual_cfg
    return ResidualSampling(cfg=cfg, temperature=self.residual_temperature)


class HARTSample(typing.NamedTuple):
  tokens: list[jax.Array]  # per scale [B, pn^2] int32
  residual: jax.Array  # [B, pn_last^2, Cvae]: the residual head's output at the last scale
  f_hat: jax.Array  # [B, H, H, Cvae]: the hybrid tokenizer's state, for its `decode`
  logits: list[jax.Array]  # per scale [2B, pn^2, V]: raw logits, conditional rows first
  hidden: jax.Array  # [2B, pn_last^2, C]: the last scale's final hidden states


def residual_head_for(head: ResidualHead | FlowResidualHead, steps: int | None) -> ResidualHead | FlowResidualHead:
  """The head itself, or a view of it that samples with `steps` steps (same parameters): respaced diffusion
  steps, or the flow head's Euler steps."""
  own = head.num_steps if isinstance(head, FlowResidualHead) else head.sample_schedule.num_steps
  if steps is None or steps == own:
    return head
  view = object.__new__(type(head))
  view.__dict__.update(head.__dict__)
  if isinstance(head, FlowResidualHead):
    object.__setattr__(view, "num_steps", int(steps))
  else:
    object.__setattr__(view, "sample_steps", str(steps))
  return view


def head_settings(head: ResidualHead | FlowResidualHead, settings: HARTSampling) -> ResidualSampling | SamplingSettings:
  """The residual head's own settings. The flow head gets the diffusion head's guidance weight: its velocity
  v_u + c (v_c - v_u) with c = 1 + g equals (1 + g) v_c - g v_u at HART's g = residual_cfg * ratio, so its
  per-scale cfg is 1 + residual_cfg; Euler steps, no per-step noise (temperature must be 1)."""
  r = settings.residual()
  if not isinstance(head, FlowResidualHead):
    return r
  if r.temperature != 1.0:
    raise ValueError(f"residual_temperature {r.temperature}: the flow residual head has no per-step noise; use 1.0")
  return SamplingSettings(cfg=r.cfg + 1.0, num_steps=head.num_steps, solver="euler")


def draws(model, keys: jax.Array, settings: HARTSampling):
  """Per-sample keys `[B]` -> (per-scale categorical draws, the residual head's normal draws). Sample i's
  draws come from keys[i] only; the residual head folds in K (the categorical head folds in 0 .. K-1)."""
  cat = CategoricalHead(model.vocab_size, settings.categorical.more_smooth)
  sides = model.patch_nums
  token_draws = [cat.draw(keys, k, pn * pn) for k, pn in enumerate(sides)]
  head = residual_head_for(model.residual_head, settings.residual_steps)
  return token_draws, head.draw(keys, len(sides), sides[-1] ** 2)


def sample(model, tokenizer, labels: jax.Array, settings: HARTSampling, token_draws, residual_noise) -> HARTSample:
  """The class-conditional sampler (see the module docstring). model: a class-conditional `HARTTransformer`
  with a residual head; tokenizer: a `HybridTokenizer` of the same scales; labels `[B]` (the null class
  `num_classes` gives unconditional samples); draws from `draws`."""
  if model.conditioning != "class":
    raise ValueError(f"the sampler is class-conditional; this model's conditioning is {model.conditioning!r}")
  if model.residual_head is None:
    raise ValueError("sampling needs the model's residual head (construct it with residual_head=dict(...))")
  sides = tuple(model.patch_nums)
  if tuple(tokenizer.patch_nums) != sides:
    raise ValueError(f"tokenizer scales {tuple(tokenizer.patch_nums)} differ from the transformer's {sides}")
  if len(sides) < 2:
    raise ValueError(f"HART's sampler needs at least 2 scales, got {sides}")
  cat_settings = settings.categorical
  cat = CategoricalHead(model.vocab_size, cat_settings.more_smooth)
  head = residual_head_for(model.residual_head, settings.residual_steps)
  b, num = labels.shape[0], len(sides)
  cond = model.embed_condition(jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)]), None)
  cos, sin = model.rope(2 * b, None)
  level = model.level_embedding()
  offsets = [0]
  for length in model.lengths:
    offsets.append(offsets[-1] + length)
  x = jnp.broadcast_to(cond[:, None], (2 * b, model.first_l, model.width)) + model.pos_start[...]
  x = x + level[:, :offsets[1]]
  empty = jnp.zeros((2 * b, 0, model.num_heads, model.width // model.num_heads), x.dtype)
  caches = [(empty, empty)] * model.depth
  f_hat = tokenizer.empty_state(b)
  tokens, all_logits = [], []
  for si in range(num):
    lo, hi = offsets[si], offsets[si + 1]
    rope = (cos[:, lo:hi], sin[:, lo:hi])
    new = []
    for block, cache in zip(model.blocks, caches):
      x, cache = block.cached(x, cond, rope, cache)
      new.append(cache)
    caches = new
    logits = model.head(model.head_nm(x, cond))
    # The official last scale reuses the loop's last ratio, (K - 2) / (K - 1).
    ramp = min(si, num - 2)
    (u, gumbel_u) = token_draws[si]
    idx, soft = cat.sample(logits[:b], logits[b:], (u, gumbel_u), cat_settings, ramp, num)
    tokens.append(idx)
    all_logits.append(logits)
    if si == num - 1:
      codes = tokenizer.quantize.embedding(idx)  # [B, n, Cvae]
      discrete = model.word_embed(codes)
      z = head.condition(x, jnp.concatenate([discrete, discrete]))
      residual = head.sample(z[:b], z[b:], residual_noise, head_settings(head, settings), ramp, num)
      f_hat, _ = tokenizer.next_input(si, f_hat, (idx, residual))
      return HARTSample(tokens, residual, f_hat, all_logits, x)
    f_hat, nxt = tokenizer.next_input(si, f_hat, idx if soft is None else soft)
    x = model.word_embed(nxt.reshape(b, -1, model.cvae)) + level[:, offsets[si + 1]:offsets[si + 2]]
    x = jnp.concatenate([x, x], axis=0)
  raise AssertionError("unreachable")

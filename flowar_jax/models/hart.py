"""HART's transformer: VAR's next-scale transformer with HART's changes (the official `HARTForT2I`,
attn_type and mlp_type 'llama'), class-conditional or driven by given text-context embeddings.

What differs from `models.var.VAR`:
- Position encoding. No absolute `pos_1LC`: attention applies HART's 2-D rotary embedding to q and k after
  their (optional) L2 norm. A token of scale pn at grid cell (i, j) has the position (i, j) * pn_last / pn, so
  every scale sits on the last scale's grid. The 2-D rotary tables are HART's: frequencies
  base^(-4 m / head_dim), m < head_dim / 4, laid out per head as [x, x, y, y] (each quarter the same m) and
  applied as q cos + rotate_half(q) sin, where rotate_half pairs channel c with c + head_dim / 2. Context
  tokens get the 1-D Llama rotary embedding of their given position ids; the image tokens' 2-D positions are
  offset by the last context token's position id (on both axes). The level embedding stays, as an
  `nn.Embedding` or (`timestep_level`) HART's timestep-embedder MLP of the level index.
- Norms. Every norm is an RMSNorm with a learned weight, the blocks' and the head's `ln_wo_grad` included
  (HART builds them with `elementwise_affine=False`, which RMSNorm ignores).
- Blocks. attention q / k / v from a bias-free `qkv_proj` plus q and v biases; the FFN is VAR's GELU MLP
  (`mlp='gpt2'`) or Llama's SwiGLU (`mlp='llama'`, hidden round_up(C * mlp_ratio * 2 / 3, 256)). adaLN as
  VAR's, or none (`adaln=False`, HART's `disable_aln`).
- Conditioning.
  * 'context' (the official text path): context `[B, T, Dctx]` -> optional RMSNorm (`context_norm`, weight
    initialised to `context_norm_scale`) -> `context_embed` -> T tokens that replace VAR's first scale (the
    first scale's logits are read from the last context token). The blocks' adaLN reads the context pooled by
    max (or a masked mean, `pooling='avg'`), the head's adaLN the max. Context tokens attend to each other
    bidirectionally (the context mask is not an attention mask in the official forward).
  * 'class' (this project's adaptation; the official code has no working class-conditional transformer): as
    VAR, the class embedding (with a null class for guidance) plus `pos_start` fills the first scale's
    pn_0^2 tokens and is the adaLN condition; positions are the 2-D grid of every scale, scale 0 included
    (the official code's `context_token == 0` branch).
- The residual head's inputs at the last scale: the final hidden states of the last scale's tokens (before
  the head's adaLN) and `word_embed(codebook[idx])` of that scale's codes (`head_inputs`); the head's
  `condition` adds and normalises them.

Parameter names mirror the official state dict (`blocks[i].attn.qkv_proj`, `ffn.gate_proj`, `ln_wo_grad`,
`context_embed`, `head_nm`, ...); see `convert.hart`.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowar_jax.heads.categorical import CategoricalHead, filter_top_k_top_p, sample_from_uniform
from flowar_jax.heads.residual import ResidualHead, TimeEmbedder
from flowar_jax.heads.residual_flow import FlowResidualHead
from flowar_jax.kernels import api as attention_api
from flowar_jax.kernels.mask import ScaleCausalMask
from flowar_jax.models import hart_sampling
from flowar_jax.models.layers import RMSNorm, linear, split_rng
from flowar_jax.models.var import FFN, MAX_SCALE_MUL, KVCache, _ada_lin_init, _normal, drop_path, l2_normalize
from flowar_jax.parallel.logical import param_axes
from flowar_jax.tokenizers.msvq import PATCH_NUMS

ROPE_BASE = 10000.0
CONDITIONINGS = ("class", "context")


def grid_positions(patch_nums: Sequence[int], last: int) -> np.ndarray:
  """`[sum pn^2, 2]` (i, j) * last / pn per token, row-major within each scale (HART's `get_position_ids`)."""
  out = []
  for pn in patch_nums:
    i, j = np.meshgrid(np.arange(pn), np.arange(pn), indexing="ij")
    out.append(np.stack([i, j], -1).reshape(-1, 2).astype(np.float32) / pn * last)
  return np.concatenate(out, 0)


def rope_2d(positions: jax.Array, head_dim: int) -> tuple[jax.Array, jax.Array]:
  """positions `[B, L, 2]` -> (cos, sin) `[B, L, head_dim]` in HART's [x, x, y, y] layout."""
  inv = 1.0 / ROPE_BASE ** (np.arange(0, head_dim, 4, dtype=np.float32) / head_dim)  # [hd/4]
  freqs = positions[..., None] * jnp.asarray(inv)  # [B, L, 2, hd/4]
  emb = jnp.concatenate([freqs, freqs], -1).reshape(*positions.shape[:-1], head_dim)
  return jnp.cos(emb), jnp.sin(emb)


def rope_1d(positions: jax.Array, head_dim: int) -> tuple[jax.Array, jax.Array]:
  """positions `[B, T]` -> (cos, sin) `[B, T, head_dim]` (Llama's layout [f, f])."""
  inv = 1.0 / ROPE_BASE ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)  # [hd/2]
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
  emb = jnp.concatenate([freqs, freqs], -1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x `[B, L, H, Dh]`, cos / sin `[B, L, Dh]` -> x cos + rotate_half(x) sin."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
  return x * cos[:, :, None] + rotated * sin[:, :, None]


def context_positions_from_mask(mask: jax.Array) -> jax.Array:
  """Context mask `[B, T]` (1 = token, right-padded) -> position ids `[B, T]`: cumsum(mask) - 1, as the
  official prompt encoding derives them (padding repeats the last token's position)."""
  return jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1


class LlamaMLP(nnx.Module):
  """down_proj(silu(gate_proj(x)) * up_proj(x)), no biases."""

  def __init__(self, dim: int, hidden: int, init_std: float, out_std: float, *, rngs: nnx.Rngs):
    self.gate_proj = linear(dim, hidden, bias=False, kernel_init=_normal(init_std), rngs=rngs, axes=("embed", "mlp"))
    self.up_proj = linear(dim, hidden, bias=False, kernel_init=_normal(init_std), rngs=rngs, axes=("embed", "mlp"))
    self.down_proj = linear(hidden, dim, bias=False, kernel_init=_normal(out_std), rngs=rngs, axes=("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def llama_hidden(dim: int, mlp_ratio: float) -> int:
  return int(dim * mlp_ratio * 2 / 3 + 255) // 256 * 256


class RotaryAttention(nnx.Module):
  """HART's `LlamaAttention`: VAR's attention (q / v biases, optional L2-normalised q, k with a learned
  per-head scale, else scores scaled by 0.25 / sqrt(Dh)) with rotary q and k."""

  def __init__(self, dim: int, num_heads: int, attn_l2_norm: bool, init_std: float, out_std: float, *,
               impl: str, rngs: nnx.Rngs):
    if dim % num_heads or (dim // num_heads) % 4:
      raise ValueError(f"width {dim} must divide into {num_heads} heads of a size divisible by 4 (2-D rotary)")
    self.num_heads, self.head_dim = num_heads, dim // num_heads
    self.qkv_proj = linear(dim, 3 * dim, bias=False, kernel_init=_normal(init_std), rngs=rngs, axes=("embed", "qkv"))
    self.q_bias = nnx.Param(jnp.zeros((dim,)), **param_axes("qkv"))
    self.v_bias = nnx.Param(jnp.zeros((dim,)), **param_axes("qkv"))
    self.attn_l2_norm = attn_l2_norm
    if attn_l2_norm:
      self.scale_mul_1H11 = nnx.Param(jnp.full((1, num_heads, 1, 1), math.log(4.0)),
                                      **param_axes(None, "heads", None, None))
    self.proj = linear(dim, dim, kernel_init=_normal(out_std), rngs=rngs, axes=("qkv", "embed"))
    self.impl = impl

  def _qkv(self, x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x `[B, l, D]` -> rotary q, k and v `[B, l, H, Dh]` (q pre-scaled for the kernels)."""
    b, l, _ = x.shape
    zero = jnp.zeros_like(self.q_bias[...])
    qkv = self.qkv_proj(x) + jnp.concatenate([self.q_bias[...], zero, self.v_bias[...]])
    qkv = qkv.reshape(b, l, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, l, H, Dh]
    if self.attn_l2_norm:
      scale = jnp.exp(jnp.minimum(self.scale_mul_1H11[...], MAX_SCALE_MUL)).reshape(1, 1, self.num_heads, 1)
      q, k = l2_normalize(q) * scale, l2_normalize(k)
      score_scale = 1.0
    else:
      score_scale = 0.25 / math.sqrt(self.head_dim)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    q = q * (score_scale * math.sqrt(self.head_dim))  # the kernels multiply scores by head_dim ** -0.5
    return q, k, v

  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: ScaleCausalMask) -> jax.Array:
    """x `[B, L, D]`, rope (cos, sin) `[B, L, Dh]` -> `[B, L, D]`."""
    b, l, dim = x.shape
    q, k, v = self._qkv(x, rope)
    out = attention_api.scale_causal_attention(q, k, v, mask, impl=self.impl)
    return self.proj(out.reshape(b, l, dim))

  def cached(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One scale of the KV-cached pass: x `[B, l, D]` with its rope `[B, l, Dh]` attends to the cached keys
    (every earlier scale, `[B, N, H, Dh]`, N may be 0) and to its own -> (`[B, l, D]`, the grown cache)."""
    b, l, dim = x.shape
    q, k, v = self._qkv(x, rope)
    k, v = jnp.concatenate([cache[0], k], axis=1), jnp.concatenate([cache[1], v], axis=1)
    out = attention_api.decode_attention(q, k, v, impl=self.impl)
    return self.proj(out.reshape(b, l, dim)), (k, v)


class HARTBlock(nnx.Module):
  """x += g1 * attn(N(x) (1 + s1) + b1); x += g2 * ffn(N(x) (1 + s2) + b2), N = RMSNorm (`ln_wo_grad`, one
  weight for both), (g, s, b) = ada_lin(silu(cond)); without adaLN x += attn(N(x)); x += ffn(N(x))."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, mlp: str, adaln: bool, attn_l2_norm: bool,
               drop_path_rate: float, norm_eps: float, init_std: float, out_std: float, init_adaln: float,
               init_adaln_gamma: float, impl: str, rngs: nnx.Rngs):
    self.attn = RotaryAttention(dim, num_heads, attn_l2_norm, init_std, out_std, impl=impl, rngs=rngs)
    if mlp == "gpt2":
      self.ffn = FFN(dim, round(dim * mlp_ratio), init_std, out_std, rngs=rngs)
    elif mlp == "llama":
      self.ffn = LlamaMLP(dim, llama_hidden(dim, mlp_ratio), init_std, out_std, rngs=rngs)
    else:
      raise ValueError(f"mlp must be 'gpt2' or 'llama', got {mlp!r}")
    self.ln_wo_grad = RMSNorm(dim, norm_eps)
    self.adaln = adaln
    if adaln:
      self.ada_lin = linear(dim, 6 * dim, rngs=rngs, axes=("embed", "modulation"),
                            kernel_init=_ada_lin_init(dim, init_std, init_adaln, init_adaln_gamma))
    self.dim, self.drop_path_rate = dim, drop_path_rate

  def _forward(self, x: jax.Array, cond: jax.Array, attend, rng: jax.Array | None) -> jax.Array:
    r1, r2 = split_rng(rng, 2)
    if not self.adaln:
      x = x + drop_path(attend(self.ln_wo_grad(x)), self.drop_path_rate, r1)
      return x + drop_path(self.ffn(self.ln_wo_grad(x)), self.drop_path_rate, r2)
    mod = self.ada_lin(jax.nn.silu(cond)).reshape(-1, 1, 6, self.dim)
    gamma1, gamma2, scale1, scale2, shift1, shift2 = (mod[:, :, i] for i in range(6))
    h = attend(self.ln_wo_grad(x) * (scale1 + 1) + shift1)
    x = x + drop_path(h * gamma1, self.drop_path_rate, r1)
    h = self.ffn(self.ln_wo_grad(x) * (scale2 + 1) + shift2)
    return x + drop_path(h * gamma2, self.drop_path_rate, r2)

  def __call__(self, x: jax.Array, cond: jax.Array, rope: tuple[jax.Array, jax.Array], mask: ScaleCausalMask,
               rng: jax.Array | None = None) -> jax.Array:
    """x `[B, L, C]`, pooled cond `[B, C]` -> `[B, L, C]`."""
    return self._forward(x, cond, lambda h: self.attn(h, rope, mask), rng)

  def cached(self, x: jax.Array, cond: jax.Array, rope: tuple[jax.Array, jax.Array], cache: KVCache
             ) -> tuple[jax.Array, KVCache]:
    """One scale of the KV-cached pass (no dropout): x `[B, l, C]` -> (`[B, l, C]`, the grown cache)."""
    grown = []

    def attend(h):
      out, new = self.attn.cached(h, rope, cache)
      grown.append(new)
      return out

    return self._forward(x, cond, attend, None), grown[0]


class HeadNorm(nnx.Module):
  """RMSNorm(x) (1 + scale) + shift, (scale, shift) = ada_lin(silu(cond)) (HART's `AdaLNBeforeHead`)."""

  def __init__(self, dim: int, norm_eps: float, init_std: float, init_adaln: float, *, rngs: nnx.Rngs):
    self.ln_wo_grad = RMSNorm(dim, norm_eps)
    self.ada_lin = linear(dim, 2 * dim, kernel_init=_normal(init_std * init_adaln), rngs=rngs,
                          axes=("embed", "modulation"))
    self.dim = dim

  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    mod = self.ada_lin(jax.nn.silu(cond)).reshape(-1, 1, 2, self.dim)
    return self.ln_wo_grad(x) * (mod[:, :, 0] + 1) + mod[:, :, 1]


RESIDUAL_HEADS = {"diffusion": ResidualHead, "flow": FlowResidualHead}


def build_residual_head(cvae: int, width: int, kwargs: dict, rngs: nnx.Rngs) -> ResidualHead | FlowResidualHead:
  """The residual head named by kwargs['kind'] ('diffusion', the official head, when absent) with the rest of
  kwargs (width, depth, num_steps, batch_mul, norm, norm_eps)."""
  kwargs = dict(kwargs)
  kind = kwargs.pop("kind", "diffusion")
  if kind not in RESIDUAL_HEADS:
    raise ValueError(f"residual_head kind must be one of {tuple(RESIDUAL_HEADS)}, got {kind!r}")
  if kind == "flow":
    kwargs["num_steps"] = int(kwargs.get("num_steps", 8))
  return RESIDUAL_HEADS[kind](cvae, width, **kwargs, rngs=rngs)


class HARTTransformer(nnx.Module):
  """HART-d`depth`. Class path: labels `[B]`; context path: context `[B, T, Dctx]` with position ids and mask
  `[B, T]`; both with next-scale inputs `[B, L - pn_0^2, Cvae]` -> logits `[B, L, V]`."""

  def __init__(self, *, depth: int = 16, conditioning: str = "class", num_classes: int = 1000,
               context_tokens: int = 300, context_dim: int = 1536, context_norm: bool = True,
               context_norm_scale: float = 1.0, pooling: str = "max", vocab_size: int = 4096, cvae: int = 32,
               patch_nums: Sequence[int] = PATCH_NUMS, mlp_ratio: float = 4.0, mlp: str = "llama",
               adaln: bool = True, timestep_level: bool = False, attn_l2_norm: bool = False,
               cond_drop_rate: float = 0.1, drop_path_rate: float = 0.0, norm_eps: float = 1e-6,
               width: int | None = None, num_heads: int | None = None, init_adaln: float = 0.5,
               init_adaln_gamma: float = 1e-5, init_head: float = 0.02, attention_impl: str = "auto",
               residual_head: dict | None = None, rngs: nnx.Rngs):
    if conditioning not in CONDITIONINGS:
      raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
    if pooling not in ("max", "avg"):
      raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
    width = 64 * depth if width is None else width
    num_heads = depth if num_heads is None else num_heads
    self.patch_nums = tuple(patch_nums)
    self.conditioning, self.pooling = conditioning, pooling
    self.depth, self.width, self.num_heads = depth, width, num_heads
    self.num_classes, self.vocab_size, self.cvae = num_classes, vocab_size, cvae
    self.cond_drop_rate = cond_drop_rate
    init_std = math.sqrt(1 / width / 3)
    out_std = init_std / math.sqrt(2 * depth)
    # The first segment: the class path's pn_0^2 start tokens, or the T context tokens.
    self.first_l = self.patch_nums[0] ** 2 if conditioning == "class" else context_tokens
    self.lengths = (self.first_l,) + tuple(p * p for p in self.patch_nums[1:])
    offsets = np.cumsum((0,) + self.lengths)
    self.mask = ScaleCausalMask(tuple(offsets[:-1]), tuple(offsets[1:]), int(offsets[-1]), int(offsets[-1]))

    self.word_embed = linear(cvae, width, kernel_init=_normal(init_std), rngs=rngs, axes=("latent", "embed"))
    if conditioning == "class":
      self.class_emb = nnx.Embed(num_classes + 1, width, embedding_init=_normal(init_std), rngs=rngs,
                                 embedding_metadata=param_axes("vocab", "embed"))
      self.pos_start = nnx.Param(jax.random.normal(rngs.params(), (1, self.first_l, width)) * init_std,
                                 **param_axes(None, "length", "embed"))
    else:
      self.context_tokens, self.context_dim = context_tokens, context_dim
      self.use_context_norm = context_norm
      if context_norm:
        self.context_norm = RMSNorm(context_dim, norm_eps)
        self.context_norm.weight[...] = jnp.full((context_dim,), context_norm_scale)
      self.context_embed = linear(context_dim, width, kernel_init=_normal(init_std), rngs=rngs,
                                  axes=("latent", "embed"))
    self.timestep_level = timestep_level
    if timestep_level:
      self.lvl_embed = TimeEmbedder(width, rngs=rngs)
    else:
      self.lvl_embed = nnx.Embed(len(self.patch_nums), width, embedding_init=_normal(init_std), rngs=rngs,
                                 embedding_metadata=param_axes(None, "embed"))
    rates = np.linspace(0, drop_path_rate, depth)
    self.blocks = nnx.List([
        HARTBlock(width, num_heads, mlp_ratio, mlp=mlp, adaln=adaln, attn_l2_norm=attn_l2_norm,
                  drop_path_rate=float(rates[i]), norm_eps=norm_eps, init_std=init_std, out_std=out_std,
                  init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, impl=attention_impl, rngs=rngs)
        for i in range(depth)])
    self.head_nm = HeadNorm(width, norm_eps, init_std, init_adaln, rngs=rngs)
    self.head = linear(width, vocab_size, kernel_init=_normal(init_std * init_head), rngs=rngs,
                       axes=("embed", "vocab"))
    # The residual head (official `diffloss` and `decoder_norm`), built from its keyword arguments (width,
    # depth, num_steps, batch_mul, and kind: 'diffusion' or 'flow'); its condition's norm is an RMSNorm as in
    # the llama transformer.
    self.residual_head = None if residual_head is None else build_residual_head(
        cvae, width, dict(dict(norm="rms", norm_eps=norm_eps), **residual_head), rngs)

  @property
  def num_tokens(self) -> int:
    """L: tokens of every scale (the logits' length)."""
    return sum(p * p for p in self.patch_nums)

  def level_embedding(self) -> jax.Array:
    """`[1, first_l + sum_{k>0} pn_k^2, C]`: the level (scale) embedding of each token of the sequence."""
    levels = jnp.asarray(np.repeat(np.arange(len(self.patch_nums)), self.lengths))
    return self.lvl_embed(levels)[None]  # an Embed row, or the timestep MLP of the level index

  def rope(self, batch: int, context_positions: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) `[B, S, Dh]` for the whole sequence."""
    head_dim = self.width // self.num_heads
    last = self.patch_nums[-1]
    if self.conditioning == "class":
      pos = jnp.broadcast_to(jnp.asarray(grid_positions(self.patch_nums, last)), (batch, self.num_tokens, 2))
      return rope_2d(pos, head_dim)
    grid = jnp.asarray(grid_positions(self.patch_nums[1:], last))[None]
    pos = grid + context_positions[:, -1, None, None].astype(jnp.float32)
    cos, sin = rope_2d(pos, head_dim)
    cos_c, sin_c = rope_1d(context_positions, head_dim)
    return jnp.concatenate([cos_c, cos], 1), jnp.concatenate([sin_c, sin], 1)

  def pool_condition(self, cond: jax.Array, mask: jax.Array | None, mode: str) -> jax.Array:
    """The adaLN condition `[B, C]`: a class embedding `[B, C]` as is; a context embedding `[B, T, C]` pooled
    by max over the tokens ('max') or by the mean over the tokens where mask `[B, T]` is 1 ('avg')."""
    if cond.ndim == 2:
      return cond
    if mode == "max":
      return jnp.max(cond, axis=1)
    m = mask.astype(cond.dtype)[..., None]
    return jnp.sum(cond * m / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0), axis=1)

  def embed_condition(self, cond_input: jax.Array, rng: jax.Array | None) -> jax.Array:
    """labels `[B]` -> class embedding `[B, C]`; context `[B, T, Dctx]` -> context embedding `[B, T, C]`.
    With `rng`, the condition is dropped with probability `cond_drop_rate` (null class, or zero context)."""
    b = cond_input.shape[0]
    if self.conditioning == "class":
      if rng is not None:
        cond_input = jnp.where(jax.random.uniform(rng, (b,)) < self.cond_drop_rate, self.num_classes, cond_input)
      return self.class_emb(cond_input)
    if rng is not None:
      keep = jax.random.uniform(rng, (b,)) >= self.cond_drop_rate
      cond_input = cond_input * keep[:, None, None].astype(cond_input.dtype)
    x = self.context_norm(cond_input) if self.use_context_norm else cond_input
    return self.context_embed(x)

  def hidden(self, cond_input: jax.Array, next_inputs: jax.Array, *, context_positions: jax.Array | None = None,
             context_mask: jax.Array | None = None, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Final hidden states `[B, S, C]` (S = first_l + L - pn_0^2) and the embedded condition (`[B, C]`, or
    `[B, T, C]`). cond_input: labels `[B]` int, or context `[B, T, Dctx]` with context_positions `[B, T]`
    (int) and context_mask `[B, T]` (read only by 'avg' pooling); next_inputs `[B, L - pn_0^2, Cvae]`."""
    b = next_inputs.shape[0]
    want = (b, self.num_tokens - self.patch_nums[0] ** 2, self.cvae)
    if next_inputs.shape != want:
      raise ValueError(f"expected next-scale inputs {want}, got {next_inputs.shape}")
    if self.conditioning == "class":
      if cond_input.shape != (b,):
        raise ValueError(f"class conditioning expects labels [{b}], got {cond_input.shape}")
    else:
      want_ctx = (b, self.context_tokens, self.context_dim)
      if cond_input.shape != want_ctx:
        raise ValueError(f"context conditioning expects context {want_ctx}, got {cond_input.shape}")
      if context_positions is None or context_positions.shape != want_ctx[:2]:
        raise ValueError(f"context conditioning needs context_positions {want_ctx[:2]}")
      if self.pooling == "avg" and (context_mask is None or context_mask.shape != want_ctx[:2]):
        raise ValueError(f"'avg' pooling needs context_mask {want_ctx[:2]}")
    drop_rng, *block_rngs = split_rng(rng, self.depth + 1)
    cond = self.embed_condition(cond_input, drop_rng)
    if self.conditioning == "class":
      first = jnp.broadcast_to(cond[:, None], (b, self.first_l, self.width)) + self.pos_start[...]
    else:
      first = cond
    x = jnp.concatenate([first, self.word_embed(next_inputs)], axis=1) + self.level_embedding()
    rope = self.rope(b, context_positions)
    block_cond = self.pool_condition(cond, context_mask, self.pooling)
    for block, block_rng in zip(self.blocks, block_rngs):
      x = block(x, block_cond, rope, self.mask, rng=block_rng)
    return x, cond

  def logits(self, hidden: jax.Array, cond: jax.Array) -> jax.Array:
    """Final hidden `[B, S, C]` and embedded condition -> logits `[B, L, V]` (the context path's first-scale
    logits come from the last context token)."""
    out = self.head(self.head_nm(hidden, self.pool_condition(cond, None, "max")))
    return out[:, self.first_l - self.patch_nums[0] ** 2:]

  def __call__(self, cond_input: jax.Array, next_inputs: jax.Array, *, context_positions: jax.Array | None = None,
               context_mask: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
    """Teacher-forced logits `[B, L, V]` (see `hidden`)."""
    hidden, cond = self.hidden(cond_input, next_inputs, context_positions=context_positions,
                               context_mask=context_mask, rng=rng)
    return self.logits(hidden, cond)

  def head_inputs(self, hidden: jax.Array, last_codes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The residual head's two condition terms at the last scale: final hidden states `[B, S, C]` and the
    last scale's code vectors `[B, pn^2, Cvae]` (codebook rows) -> (hidden of the last scale `[B, pn^2, C]`,
    word_embed(codes) `[B, pn^2, C]`), for `ResidualHead.condition`."""
    n = self.patch_nums[-1] ** 2
    return hidden[:, -n:], self.word_embed(last_codes)

  # Training and sampling (class-conditional path).

  def head_codes(self, logits: jax.Array, rng: jax.Array, top_k: int = 600, top_p: float = 0.96) -> jax.Array:
    """The last scale's codes the residual head is conditioned on in training: drawn from the model's own
    (stopped) logits `[B, n, V]` with top-k (clipped to V) and top-p, as the official forward draws them
    (top-k 600, top-p 0.96) -> `[B, n]` int32."""
    logits = filter_top_k_top_p(jax.lax.stop_gradient(logits), min(top_k, self.vocab_size), top_p)
    return sample_from_uniform(logits, jax.random.uniform(rng, logits.shape[:-1]))

  def loss(self, tokens, labels: jax.Array, rng: jax.Array, *, tokenizer, train: bool = True
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Class-conditional training objective: cross-entropy over every code of every scale (each token weighs
    the same, as VAR trains) plus the residual head's loss at the last scale.

    tokens: the hybrid tokenizer's `encode` output (`HybridTokens`: per-scale indices `[B, pn^2]` and the last
    scale's continuous token `rest_before_last [B, pn_last^2, Cvae]`); labels `[B]`; `tokenizer` the
    `HybridTokenizer` (teacher-forced inputs, codebook). As the official forward: the head's condition is
    decoder_norm(h + word_embed(embed(idx))), h the last scale's final hidden states and idx codes drawn from
    the model's own last-scale logits (`head_codes`); its target is rest_before_last - embed(idx). The
    official forward also drops a random subset of the last scale's tokens; that masking is not implemented
    (with 16 last-scale tokens or fewer the official forward drops none, see docs/hart.md). Loss = CE +
    residual loss (the official repository has no trainer; weight 1 here). Condition dropout and stochastic
    depth act only when `train`. Metrics: `loss_scale_{pn}`, `ce`, `residual_loss`, `token_accuracy`, `loss`.
    """
    if self.conditioning != "class":
      raise ValueError(f"loss takes the class-conditional path; this model's conditioning is {self.conditioning!r}")
    if self.residual_head is None:
      raise ValueError("loss needs the model's residual head (construct it with residual_head=dict(...))")
    fwd_rng, code_rng, head_rng = jax.random.split(rng, 3)
    targets, inputs = tokenizer.teacher_forcing(tokens)
    hidden, cond = self.hidden(labels, inputs, rng=fwd_rng if train else None)
    logits = self.logits(hidden, cond)
    total_tokens, cat = self.num_tokens, CategoricalHead(self.vocab_size)
    metrics, ce, start = {}, jnp.zeros((), jnp.float32), 0
    for pn, target in zip(self.patch_nums, targets):
      loss_k = cat.loss(logits[:, start:start + pn * pn], target)
      metrics[f"loss_scale_{pn}"] = loss_k
      ce = ce + loss_k * (pn * pn / total_tokens)
      start += pn * pn
    flat_targets = jnp.concatenate([t.reshape(t.shape[0], -1) for t in targets], axis=1)
    metrics["token_accuracy"] = jnp.mean((jnp.argmax(logits, axis=-1) == flat_targets).astype(jnp.float32))
    n = self.patch_nums[-1] ** 2
    idx = self.head_codes(logits[:, -n:], code_rng)
    codes = jax.lax.stop_gradient(tokenizer.quantize.embedding(idx))  # [B, n, Cvae]
    z = self.residual_head.condition(*self.head_inputs(hidden, codes))
    target = jax.lax.stop_gradient(tokens.rest_before_last) - codes
    residual_loss = self.residual_head.loss(z, target, head_rng)
    total = ce + residual_loss
    metrics.update(ce=ce, residual_loss=residual_loss, loss=total)
    return total, metrics

  def sample(self, tokenizer, labels: jax.Array, keys: jax.Array, settings, known=None) -> jax.Array:
    """labels `[B]`, per-sample keys `[B]` -> f_hat `[B, H, H, Cvae]` (the hybrid tokenizer's state, for its
    `decode`): codes at every scale, then the residual head's output at the last one (`models.hart_sampling`,
    settings a `HARTSampling`). Sample i's draws come from keys[i] only. `known` (editing) is not supported."""
    if known is not None:
      raise ValueError("HART's sampler does not support known tokens (editing)")
    if not isinstance(settings, hart_sampling.HARTSampling):
      raise ValueError(f"settings must be a HARTSampling, got {type(settings).__name__}")
    token_draws, residual_noise = hart_sampling.draws(self, keys, settings)
    return hart_sampling.sample(self, tokenizer, labels, settings, token_draws, residual_noise).f_hat

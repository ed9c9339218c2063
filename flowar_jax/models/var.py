"""VAR: a next-scale prediction transformer over a multi-scale VQVAE's token maps (class-conditional).

Width = 64 x depth, heads = depth. The sequence holds every scale's tokens, coarse to fine (L = sum pn^2; 680
for patch_nums 1..16). The first scale's pn_0^2 tokens are the class embedding plus `pos_start`; scale k > 0
reads the VQ's f_hat after scales 0..k-1, area-downsampled to its side, through `word_embed`. Every token adds
a level (scale) embedding and its absolute position embedding. Each block is adaLN-modulated by the class
embedding (its own `ada_lin`, or with `shared_aln` one shared projection plus a per-block `ada_gss`), and
attends scale-causally: a token sees every token of its own and earlier scales. With `attn_l2_norm`, q and k
are L2-normalised per head and q scaled by exp(min(scale_mul, log 100)), a learned per-head scale; otherwise
the score scale is 0.25 / sqrt(head_dim). The head is an adaLN'd LayerNorm and a linear layer to the V logits.

Attention goes through `flowar_jax.kernels.api` (mask from the scale boundaries; the KV-cached step attends to
everything cached). Its kernels scale scores by head_dim^-0.5, so q is pre-multiplied by sqrt(head_dim) to get
VAR's scale (an exact power of two for head_dim 64). Parameter names mirror the official state dict
(`blocks[i].attn.mat_qkv`, `q_bias`, `scale_mul_1H11`, `ffn.fc1`, `ada_lin`, `head_nm.ada_lin`, ...).
"""
from __future__ import annotations

import math
import typing
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowar_jax.heads.categorical import CategoricalHead, CategoricalSampling
from flowar_jax.kernels import api as attention_api
from flowar_jax.kernels.mask import ScaleCausalMask
from flowar_jax.models.layers import TOKENS, linear, split_rng
from flowar_jax.parallel.logical import constrain, param_axes
from flowar_jax.parallel.remat import remat
from flowar_jax.scales import ScaleSchedule
from flowar_jax.tokenizers.msvq import PATCH_NUMS, MultiScaleVQVAE

KVCache = tuple[jax.Array, jax.Array]  # keys, values [B, N, H, Dh]
MAX_SCALE_MUL = math.log(100.0)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm without affine parameters over the last axis (biased variance, as torch)."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def l2_normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def drop_path(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Stochastic depth: zeroes a sample's whole branch with probability `rate` (rescaling the rest)."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def _normal(std: float):
  # torch's trunc_normal_ truncates at +-2 absolute, i.e. nowhere at these std: a plain normal.
  return nnx.initializers.normal(std)


class SelfAttention(nnx.Module):
  """Multi-head self-attention with a bias-free `mat_qkv`, learned q and v biases (k has none)."""

  def __init__(self, dim: int, num_heads: int, attn_l2_norm: bool, init_std: float, out_std: float, *,
               impl: str, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"width {dim} must divide by the number of heads {num_heads}")
    self.num_heads, self.head_dim = num_heads, dim // num_heads
    self.mat_qkv = linear(dim, 3 * dim, bias=False, kernel_init=_normal(init_std), rngs=rngs, axes=("embed", "qkv"))
    self.q_bias = nnx.Param(jnp.zeros((dim,)), **param_axes("qkv"))
    self.v_bias = nnx.Param(jnp.zeros((dim,)), **param_axes("qkv"))
    self.attn_l2_norm = attn_l2_norm
    if attn_l2_norm:
      self.scale_mul_1H11 = nnx.Param(jnp.full((1, num_heads, 1, 1), math.log(4.0)),
                                      **param_axes(None, "heads", None, None))
    self.proj = linear(dim, dim, kernel_init=_normal(out_std), rngs=rngs, axes=("qkv", "embed"))
    self.impl = impl

  def __call__(self, x: jax.Array, mask: ScaleCausalMask | None, cache: KVCache | None = None
               ) -> tuple[jax.Array, KVCache | None]:
    """x `[B, l, D]` -> (`[B, l, D]`, cache). With `cache` (possibly empty, N = 0) the new keys and values
    are appended and every cached key is visible (`mask` unused); without, `mask` applies."""
    b, l, dim = x.shape
    zero = jnp.zeros_like(self.q_bias[...])
    qkv = self.mat_qkv(x) + jnp.concatenate([self.q_bias[...], zero, self.v_bias[...]])
    q, k, v = jnp.split(qkv.reshape(b, l, 3, self.num_heads, self.head_dim), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [B, l, H, Dh]
    if self.attn_l2_norm:
      scale = jnp.exp(jnp.minimum(self.scale_mul_1H11[...], MAX_SCALE_MUL)).reshape(1, 1, self.num_heads, 1)
      q, k = l2_normalize(q) * scale, l2_normalize(k)
    else:
      q = q * (0.25 / math.sqrt(self.head_dim))
    q = q * math.sqrt(self.head_dim)  # the kernels multiply scores by head_dim ** -0.5
    if cache is None:
      out = attention_api.scale_causal_attention(q, k, v, mask, impl=self.impl)
    else:
      k, v = jnp.concatenate([cache[0], k], axis=1), jnp.concatenate([cache[1], v], axis=1)
      cache = (k, v)
      out = attention_api.decode_attention(q, k, v, impl=self.impl)
    return self.proj(out.reshape(b, l, dim)), cache


class FFN(nnx.Module):
  """fc1, tanh-approximated GELU, fc2."""

  def __init__(self, dim: int, hidden: int, init_std: float, out_std: float, *, rngs: nnx.Rngs):
    self.fc1 = linear(dim, hidden, kernel_init=_normal(init_std), rngs=rngs, axes=("embed", "mlp"))
    self.fc2 = linear(hidden, dim, kernel_init=_normal(out_std), rngs=rngs, axes=("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


def _ada_lin_init(dim: int, init_std: float, init_adaln: float, init_adaln_gamma: float):
  """Kernel [D, 6C]: the two gammas' columns scaled by init_adaln_gamma, the scales and shifts by init_adaln."""
  def init(key, shape, dtype=jnp.float32):
    w = jax.random.normal(key, shape, dtype) * init_std
    col = jnp.arange(shape[-1]) < 2 * dim
    return w * jnp.where(col, init_adaln_gamma, init_adaln)
  return init


class AdaLNSelfAttn(nnx.Module):
  """x += g1 * attn(LN(x) (1 + s1) + b1); x += g2 * ffn(LN(x) (1 + s2) + b2); (g1, g2, s1, s2, b1, b2)
  from the condition: `ada_lin(silu(cond))`, or `ada_gss` + the shared projection with `shared_aln`."""

  def __init__(self, dim: int, cond_dim: int, num_heads: int, mlp_ratio: float, *, shared_aln: bool,
               attn_l2_norm: bool, drop_path_rate: float, norm_eps: float, init_std: float, out_std: float,
               init_adaln: float, init_adaln_gamma: float, impl: str, rngs: nnx.Rngs):
    self.attn = SelfAttention(dim, num_heads, attn_l2_norm, init_std, out_std, impl=impl, rngs=rngs)
    self.ffn = FFN(dim, round(dim * mlp_ratio), init_std, out_std, rngs=rngs)
    self.shared_aln = shared_aln
    if shared_aln:
      gss = jax.random.normal(rngs.params(), (1, 1, 6, dim)) / math.sqrt(dim)
      self.ada_gss = nnx.Param(gss * jnp.asarray([init_adaln_gamma] * 2 + [init_adaln] * 4)[:, None],
                               **param_axes(None, None, None, "embed"))
    else:
      self.ada_lin = linear(cond_dim, 6 * dim, rngs=rngs, axes=("embed", "modulation"),
                            kernel_init=_ada_lin_init(dim, init_std, init_adaln, init_adaln_gamma))
    self.dim, self.drop_path_rate, self.norm_eps = dim, drop_path_rate, norm_eps

  def __call__(self, x: jax.Array, cond: jax.Array, mask: ScaleCausalMask | None, cache: KVCache | None = None,
               rng: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
    """x `[B, l, C]`; cond `[B, D]` (or the shared `[B, 1, 6, C]` with shared_aln) -> (`[B, l, C]`, cache)."""
    if self.shared_aln:
      mod = self.ada_gss[...] + cond  # [B, 1, 6, C]
    else:
      mod = self.ada_lin(jax.nn.silu(cond)).reshape(-1, 1, 6, self.dim)
    gamma1, gamma2, scale1, scale2, shift1, shift2 = (mod[:, :, i] for i in range(6))
    r1, r2 = split_rng(rng, 2)
    h, cache = self.attn(layer_norm(x, self.norm_eps) * (scale1 + 1) + shift1, mask, cache)
    x = x + drop_path(h * gamma1, self.drop_path_rate, r1)
    h = self.ffn(layer_norm(x, self.norm_eps) * (scale2 + 1) + shift2)
    return x + drop_path(h * gamma2, self.drop_path_rate, r2), cache


class AdaLNBeforeHead(nnx.Module):
  """LN(x) (1 + scale) + shift with (scale, shift) = ada_lin(silu(cond))."""

  def __init__(self, dim: int, cond_dim: int, norm_eps: float, init_std: float, init_adaln: float, *,
               rngs: nnx.Rngs):
    self.ada_lin = linear(cond_dim, 2 * dim, kernel_init=_normal(init_std * init_adaln), rngs=rngs,
                          axes=("embed", "modulation"))
    self.dim, self.norm_eps = dim, norm_eps

  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    mod = self.ada_lin(jax.nn.silu(cond)).reshape(-1, 1, 2, self.dim)
    return layer_norm(x, self.norm_eps) * (mod[:, :, 0] + 1) + mod[:, :, 1]


class VAR(nnx.Module):
  """VAR-d`depth`: labels `[B]` and next-scale inputs `[B, L - pn_0^2, Cvae]` -> logits `[B, L, V]`."""

  def __init__(self, *, depth: int = 16, num_classes: int = 1000, vocab_size: int = 4096, cvae: int = 32,
               patch_nums: Sequence[int] = PATCH_NUMS, mlp_ratio: float = 4.0, shared_aln: bool = False,
               attn_l2_norm: bool = True, cond_drop_rate: float = 0.1, drop_path_rate: float | None = None,
               norm_eps: float = 1e-6, width: int | None = None, num_heads: int | None = None,
               init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
               attention_impl: str = "auto", remat_policy: str = "none", rngs: nnx.Rngs):
    width = 64 * depth if width is None else width
    num_heads = depth if num_heads is None else num_heads
    drop_path_rate = 0.1 * depth / 24 if drop_path_rate is None else drop_path_rate
    self.schedule = ScaleSchedule(tuple(patch_nums))
    self.depth, self.width, self.num_heads = depth, width, num_heads
    self.num_classes, self.vocab_size, self.cvae = num_classes, vocab_size, cvae
    self.cond_drop_rate = cond_drop_rate
    self.remat_policy = remat_policy
    self.mask = ScaleCausalMask.from_schedule(self.schedule)
    init_std = math.sqrt(1 / width / 3)
    out_std = init_std / math.sqrt(2 * depth)
    first_l = self.schedule.lengths[0]

    self.word_embed = linear(cvae, width, kernel_init=_normal(init_std), rngs=rngs, axes=("latent", "embed"))
    self.class_emb = nnx.Embed(num_classes + 1, width, embedding_init=_normal(init_std), rngs=rngs,
                               embedding_metadata=param_axes("vocab", "embed"))
    self.pos_start = nnx.Param(jax.random.normal(rngs.params(), (1, first_l, width)) * init_std,
                               **param_axes(None, "length", "embed"))
    self.pos_1LC = nnx.Param(jax.random.normal(rngs.params(), (1, self.schedule.num_tokens, width)) * init_std,
                             **param_axes(None, "length", "embed"))
    self.lvl_embed = nnx.Embed(self.schedule.num_scales, width, embedding_init=_normal(init_std), rngs=rngs,
                               embedding_metadata=param_axes(None, "embed"))  # one row per scale
    self.shared_aln = shared_aln
    if shared_aln:
      self.shared_ada_lin = linear(width, 6 * width, kernel_init=_normal(init_std), rngs=rngs,
                                   axes=("embed", "modulation"))
    rates = np.linspace(0, drop_path_rate, depth)
    self.blocks = nnx.List([
        AdaLNSelfAttn(width, width, num_heads, mlp_ratio, shared_aln=shared_aln, attn_l2_norm=attn_l2_norm,
                      drop_path_rate=float(rates[i]), norm_eps=norm_eps, init_std=init_std, out_std=out_std,
                      init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, impl=attention_impl, rngs=rngs)
        for i in range(depth)])
    self.head_nm = AdaLNBeforeHead(width, width, norm_eps, init_std, init_adaln, rngs=rngs)
    self.head = linear(width, vocab_size, kernel_init=_normal(init_std * init_head), rngs=rngs,
                       axes=("embed", "vocab"))

  @property
  def level_position(self) -> jax.Array:
    """`[1, L, C]`: each token's level embedding plus its absolute position embedding."""
    levels = np.repeat(np.arange(self.schedule.num_scales), self.schedule.lengths)
    return self.lvl_embed(jnp.asarray(levels))[None] + self.pos_1LC[...]

  def block_condition(self, cond: jax.Array) -> jax.Array:
    """Class embedding `[B, C]` -> what each block's adaLN reads: itself, or the shared `[B, 1, 6, C]`."""
    if self.shared_aln:
      return self.shared_ada_lin(jax.nn.silu(cond)).reshape(-1, 1, 6, self.width)
    return cond

  def logits(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    """Final hidden `[B, l, C]` and class embedding `[B, C]` -> logits `[B, l, V]`."""
    return self.head(self.head_nm(x, cond))

  def __call__(self, labels: jax.Array, next_inputs: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
    """Teacher-forced logits. labels `[B]` int; next_inputs `[B, L - pn_0^2, Cvae]` (the VQ's
    `teacher_forcing_input`) -> `[B, L, V]`.

    With `rng` (training), labels are replaced by the null class with probability `cond_drop_rate`, and the
    blocks' residual branches are dropped per sample (stochastic depth).
    """
    b = labels.shape[0]
    want = (b, self.schedule.num_tokens - self.schedule.lengths[0], self.cvae)
    if next_inputs.shape != want:
      raise ValueError(f"expected next-scale inputs {want}, got {next_inputs.shape}")
    drop_rng, *block_rngs = split_rng(rng, self.depth + 1)
    if drop_rng is not None:
      dropped = jax.random.uniform(drop_rng, (b,)) < self.cond_drop_rate
      labels = jnp.where(dropped, self.num_classes, labels)
    cond = self.class_emb(labels)
    first_l = self.schedule.lengths[0]
    sos = jnp.broadcast_to(cond[:, None], (b, first_l, self.width)) + self.pos_start[...]
    x = jnp.concatenate([sos, self.word_embed(next_inputs)], axis=1) + self.level_position
    block_cond, mask = self.block_condition(cond), self.mask
    # Rematerialised per block as FlowAR's are (the blocks differ in drop-path rate, so they are not scanned).
    run = remat(lambda block, x, r: block(x, block_cond, mask, rng=r)[0], self.remat_policy)
    x = constrain(x, TOKENS)
    for block, block_rng in zip(self.blocks, block_rngs):
      x = constrain(run(block, x, block_rng), TOKENS)
    return self.logits(x, cond)

  def head_seam(self, more_smooth: bool = False) -> CategoricalHead:
    """The categorical head over this model's logits."""
    return CategoricalHead(self.vocab_size, more_smooth)

  def loss(self, indices: list[jax.Array], labels: jax.Array, rng: jax.Array, *, tokenizer: MultiScaleVQVAE,
           train: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy over every token of every scale (each token weighs the same, as VAR trains).

    indices: per scale `[B, pn^2]` (the VQ's `encode`); labels `[B]`; `tokenizer` builds the teacher-forced
    inputs. Condition dropout and stochastic depth act only when `train`. Metrics: the loss per scale side,
    and the top-1 token accuracy.
    """
    targets, inputs = tokenizer.teacher_forcing(indices)
    logits = self(labels, inputs, rng=rng if train else None)
    head, total_tokens = self.head_seam(), self.schedule.num_tokens
    metrics, total = {}, jnp.zeros((), jnp.float32)
    for side, length, logits_k, target in zip(self.schedule.sides, self.schedule.lengths,
                                              self.schedule.split(logits), targets):
      loss_k = head.loss(logits_k, target)
      metrics[f"loss_scale_{side}"] = loss_k
      total = total + loss_k * (length / total_tokens)
    flat_targets = jnp.concatenate([t.reshape(t.shape[0], -1) for t in targets], axis=1)
    metrics["token_accuracy"] = jnp.mean((jnp.argmax(logits, axis=-1) == flat_targets).astype(jnp.float32))
    metrics["loss"] = total
    return total, metrics

  def sample(self, tokenizer: MultiScaleVQVAE, labels: jax.Array, keys: jax.Array,
             settings: CategoricalSampling, known: KnownTokens | None = None) -> jax.Array:
    """labels `[B]`, per-sample keys `[B]` -> f_hat `[B, H, H, Cvae]` after the last scale (the tokenizer's state,
    for its `decode`). Each sample's draws come from its own key, so it does not depend on its batch. With
    `known`, only the masked tokens are generated (zero-shot editing, see `sample`)."""
    head = self.head_seam(settings.more_smooth)
    draws = [head.draw(keys, k, length) for k, length in enumerate(self.schedule.lengths)]
    uniforms = [u for u, _ in draws]
    gumbels = [g for _, g in draws] if settings.more_smooth else None
    return sample(self, tokenizer, labels, settings, (uniforms, gumbels), known).f_hat

  def cached_step(self, scale: int, tokens: jax.Array, cond: jax.Array, caches: list[KVCache] | None
                  ) -> tuple[jax.Array, list[KVCache]]:
    """One scale of autoregressive decoding. tokens `[B, pn^2, C]` (embedded, level and position added), cond
    `[B, C]`, caches from the scales before (None at scale 0) -> (logits `[B, pn^2, V]`, caches)."""
    if (caches is None) != (scale == 0):
      raise ValueError(f"scale {scale}: caches must be None exactly at scale 0")
    if caches is None:
      empty = jnp.zeros((tokens.shape[0], 0, self.num_heads, self.width // self.num_heads), tokens.dtype)
      caches = [(empty, empty)] * self.depth
    block_cond, x, new = self.block_condition(cond), tokens, []
    for block, cache in zip(self.blocks, caches):
      x, cache = block(x, block_cond, None, cache)
      new.append(cache)
    return self.logits(x, cond), new


class KnownTokens(typing.NamedTuple):
  """Tokens to keep while sampling (zero-shot editing): per scale, the image's own indices `[B, pn^2]` and a mask
  `[B, pn^2]`, True where the token is generated."""
  indices: list[jax.Array]
  generate: list[jax.Array]


class VARSample(typing.NamedTuple):
  tokens: list[jax.Array]  # per scale [B, pn^2] int32
  f_hat: jax.Array  # [B, H, H, Cvae]: decode with the VQVAE's `decode_fhat`
  logits: list[jax.Array]  # per scale [2B, pn^2, V]: the raw (unguided) logits, conditional rows first


def sampling_draws(rng: jax.Array, batch: int, patch_nums: Sequence[int], vocab_size: int, more_smooth: bool
                   ) -> tuple[list[jax.Array], list[jax.Array] | None]:
  """Uniform draws for `sample`: per scale `[B, pn^2]`, and with `more_smooth` per scale `[B, pn^2, V]`."""
  keys = jax.random.split(rng, 2 * len(patch_nums))
  tiny = float(jnp.finfo(jnp.float32).tiny)
  tokens = [jax.random.uniform(keys[i], (batch, pn * pn)) for i, pn in enumerate(patch_nums)]
  if not more_smooth:
    return tokens, None
  gumbel = [jax.random.uniform(keys[len(patch_nums) + i], (batch, pn * pn, vocab_size), minval=tiny)
            for i, pn in enumerate(patch_nums)]
  return tokens, gumbel


def sample(model: VAR, tokenizer: MultiScaleVQVAE, labels: jax.Array, settings: CategoricalSampling,
           draws: tuple[list[jax.Array], list[jax.Array] | None], known: KnownTokens | None = None) -> VARSample:
  """VAR's KV-cached class-conditional sampler over all scales with classifier-free guidance.

  labels `[B]` (the null class `num_classes` gives unconditional samples); `draws` from `sampling_draws` (or
  any uniform draws of those shapes). The conditional and unconditional batches run together (2B rows).
  With `known`, each scale's tokens outside its mask are the given ones (as sampled tokens would be: they
  feed f_hat and every later scale), so the model generates only the masked tokens, conditioned on them.
  """
  if tuple(tokenizer.patch_nums) != model.schedule.sides:
    raise ValueError(f"VQ scales {tokenizer.patch_nums} differ from the transformer's {model.schedule.sides}")
  uniforms, gumbels = draws
  if settings.more_smooth and gumbels is None:
    raise ValueError("more_smooth sampling needs gumbel draws [B, l, V]")
  head = model.head_seam(settings.more_smooth)
  b, sides = labels.shape[0], model.schedule.sides
  cond = model.class_emb(jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)]))
  lvl_pos = model.level_position
  offsets = model.schedule.offsets
  tokens_in = (jnp.broadcast_to(cond[:, None], (2 * b, sides[0] ** 2, model.width)) + model.pos_start[...]
               + lvl_pos[:, :offsets[1]])
  f_hat = tokenizer.empty_state(b)
  caches, tokens, all_logits = None, [], []
  last = len(sides) - 1
  for si in range(len(sides)):
    logits, caches = model.cached_step(si, tokens_in, cond, caches)
    noise = (uniforms[si], None if gumbels is None else gumbels[si])
    idx, soft = head.sample(logits[:b], logits[b:], noise, settings, si, len(sides))
    if known is not None:
      keep = jnp.logical_not(known.generate[si])
      idx = jnp.where(keep, known.indices[si].astype(idx.dtype), idx)
      if soft is not None:
        soft = jnp.where(keep[..., None], jax.nn.one_hot(known.indices[si], soft.shape[-1], dtype=soft.dtype), soft)
    f_hat, nxt = tokenizer.next_input(si, f_hat, idx if soft is None else soft)
    tokens.append(idx)
    all_logits.append(logits)
    if si != last:
      x = model.word_embed(nxt.reshape(b, -1, model.cvae)) + lvl_pos[:, offsets[si + 1]:offsets[si + 2]]
      tokens_in = jnp.concatenate([x, x], axis=0)
  return VARSample(tokens, f_hat, all_logits)

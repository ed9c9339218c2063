"""The FlowAR backbone: two stacks of adaLN transformer blocks over all scales, scale-causal attention.

Sequence: token 0 is the condition's vector (the class embedding, or a prompt's projected pooled vector: the
1x1 scale's input); the tokens of scale k >= 1 are the
projected inputs built from scale k - 1 (see `flowar_jax.scales.pyramid`). The output z holds one
D-vector per token that conditions the flow head of that token's scale. A text-conditional backbone's blocks
also cross-attend to the prompt's token states (`flowar_jax.models.conditioning`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from flowar_jax.kernels import ScaleCausalMask, decode_attention, scale_causal_attention
from flowar_jax.models.attention import SelfAttention, TextCrossAttention
from flowar_jax.models.conditioning import Condition, as_condition
from flowar_jax.models.layers import TOKENS, GatedMLP, RMSNorm, linear, mlp_hidden, modulate, rms_norm, split_rng
from flowar_jax.models.rope import sequence_rope_tables
from flowar_jax.parallel.logical import constrain, param_axes, with_axes
from flowar_jax.parallel.blocks import run_blocks
from flowar_jax.scales import ScaleSchedule

KVCache = tuple[jax.Array, jax.Array]  # keys, values [B, N_seen, H, Dh]


class BackboneBlock(nnx.Module):
  """x += g1 * Attn(norm(x) * (1 + s1) + b1); x += g2 * MLP(norm(x) * (1 + s2) + b2), adaLN from the condition.

  With `cross_attention` (text), x += CrossAttn(norm(x), the prompt's token states) between the two.
  """

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn_dropout: float, proj_dropout: float,
               *, rngs: nnx.Rngs, attention_impl: str = "xla", cross_attention: bool = False):
    self.attn = SelfAttention(dim, num_heads, qkv_bias=True, attn_dropout=attn_dropout,
                              proj_dropout=proj_dropout, rngs=rngs)
    self.cross_attn = TextCrossAttention(dim, num_heads, rngs=rngs) if cross_attention else None
    self.attention_impl = attention_impl  # 'xla' | 'pallas' | 'auto', see flowar_jax.kernels
    self.mlp = GatedMLP(dim, mlp_hidden(dim, mlp_ratio), dropout_rate=proj_dropout, rngs=rngs)
    self.ada_lin = linear(dim, 6 * dim, rngs=rngs, axes=("embed", "modulation"))

  def _modulation(self, cond: jax.Array) -> list[jax.Array]:
    """cond `[B, D]` -> gamma1, gamma2, scale1, scale2, shift1, shift2, each `[B, 1, D]`."""
    mod = self.ada_lin(jax.nn.silu(cond)).reshape(cond.shape[0], 1, 6, -1)
    return [mod[:, :, i] for i in range(6)]

  def __call__(self, x: jax.Array, cond: Condition | jax.Array, cos: jax.Array, sin: jax.Array,
               mask: ScaleCausalMask | None, rng: jax.Array | None = None, *,
               cache: KVCache | None = None) -> jax.Array | tuple[jax.Array, KVCache]:
    """One definition for both passes; cond a `Condition` or its vector `[B, D]` alone (a class).

    With a `mask` (the keys each token sees), the teacher-forced pass: x `[B, L, D]` -> `[B, L, D]`.
    With `mask` None, one scale of the KV-cached pass: x `[B, n, D]` attends to `cache` (the keys and values
    of the scales before, None for the first) and to its own scale -> (`[B, n, D]`, the extended cache).
    Dropout is on when `rng` is given.
    """
    r_attn, r_mlp = split_rng(rng, 2)
    cond = as_condition(cond)
    g1, g2, s1, s2, b1, b2 = self._modulation(cond.vector)
    attended, kv = self._attention(modulate(rms_norm(x), b1, s1), cos, sin, mask, r_attn, cache)
    x = x + attended * g1
    if self.cross_attn is not None:
      if cond.context is None:
        raise ValueError("this backbone cross-attends to a prompt's token states; the condition has none")
      x = x + self.cross_attn(rms_norm(x), cond.context, cond.context_mask)
    x = x + self.mlp(modulate(rms_norm(x), b2, s2), r_mlp) * g2
    return x if mask is not None else (x, kv)

  def _attention(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: ScaleCausalMask | None,
                 rng: jax.Array | None, cache: KVCache | None) -> tuple[jax.Array, KVCache]:
    """`SelfAttention.__call__` (same rng split) with the attention of `flowar_jax.kernels`: scale-causal over
    the whole sequence given a `mask`, else this scale's queries over the cached keys and its own."""
    r_attn, r_proj = split_rng(rng, 2)
    q, k, v = self.attn.project_qkv(x, cos, sin)
    if mask is not None:
      attended = scale_causal_attention(q, k, v, mask, impl=self.attention_impl,
                                        dropout_rate=self.attn.attn_dropout, rng=r_attn)
    else:
      if cache is not None:
        k = jnp.concatenate([cache[0], k], axis=1)
        v = jnp.concatenate([cache[1], v], axis=1)
      attended = decode_attention(q, k, v, impl=self.attention_impl)
    return self.attn.output(attended, r_proj), (k, v)


class Backbone(nnx.Module):
  """x + pos_enc -> RMSNorm -> encoder blocks -> RMSNorm -> Linear + pos_dec -> decoder blocks -> RMSNorm + pos_diff."""

  def __init__(self, config: ml_collections.ConfigDict, latent_channels: int, *, rngs: nnx.Rngs):
    """`config` is `config.model`; the last of `config.scales` is the latent side."""
    self.schedule = ScaleSchedule(tuple(config.scales))
    dim, length = config.width, self.schedule.num_tokens
    self.num_classes = config.num_classes
    self.conditioning = config.get("conditioning", "class")
    self.num_heads = config.num_heads
    self.remat_policy = config.get("remat", "none")
    self.scan_blocks = config.get("scan_blocks", False)
    embed_init = nnx.initializers.normal(0.02)
    # One extra row: the null class used for label dropout and the unconditional branch of CFG. A text
    # backbone has none: its vector comes from the prompt (`flowar_jax.models.conditioning`).
    if self.conditioning == "class":
      self.class_emb = nnx.Embed(config.num_classes + 1, dim, embedding_init=embed_init, rngs=rngs,
                                 embedding_metadata=param_axes("vocab", "embed"))
    self.z_proj = linear(latent_channels, dim, rngs=rngs, axes=("latent", "embed"))
    self.z_proj_ln = RMSNorm(dim)
    pos_init = with_axes(embed_init, None, "length", "embed")
    self.encoder_pos_embed_learned = nnx.Param(pos_init(rngs.params(), (1, length, dim)))
    self.decoder_pos_embed_learned = nnx.Param(pos_init(rngs.params(), (1, length, dim)))
    self.diffusion_pos_embed_learned = nnx.Param(pos_init(rngs.params(), (1, length, dim)))

    def stack():
      return nnx.List([BackboneBlock(dim, config.num_heads, config.mlp_ratio, config.attn_dropout,
                                     config.proj_dropout, rngs=rngs, attention_impl=config.attention_impl,
                                     cross_attention=self.conditioning == "text")
                       for _ in range(config.depth)])

    self.encoder_blocks = stack()
    self.encoder_norm = RMSNorm(dim)
    self.decoder_embed = linear(dim, dim, rngs=rngs, axes=("embed", "embed"))
    self.decoder_blocks = stack()
    self.decoder_norm = RMSNorm(dim)

  def _rope(self) -> tuple[jax.Array, jax.Array]:
    head_dim = self.encoder_pos_embed_learned.shape[-1] // self.num_heads
    return sequence_rope_tables(self.schedule.sides, self.schedule.latent_side, head_dim)

  def embed_inputs(self, class_embedding: jax.Array, scale_inputs: jax.Array) -> jax.Array:
    """class_embedding `[B, D]`, scale_inputs `[B, L - 1, C]` -> tokens `[B, L, D]`."""
    return jnp.concatenate([class_embedding[:, None], self.z_proj(scale_inputs)], axis=1)

  def __call__(self, cond: Condition | jax.Array, scale_inputs: jax.Array,
               rng: jax.Array | None = None) -> jax.Array:
    """Teacher-forced pass over all scales: cond (or the class embedding `[B, D]`), scale_inputs `[B, L - 1, C]`
    -> z `[B, L, D]`. Dropout is on when `rng` is given."""
    cond = as_condition(cond)
    cos, sin = self._rope()
    mask = ScaleCausalMask.from_schedule(self.schedule)
    rngs = split_rng(rng, len(self.encoder_blocks) + len(self.decoder_blocks))
    stack = dict(remat_policy=self.remat_policy, scan=self.scan_blocks, names=TOKENS)
    x = self.embed_inputs(cond.vector, scale_inputs)
    x = constrain(self.z_proj_ln(x + self.encoder_pos_embed_learned[...]), TOKENS)
    x = run_blocks(self.encoder_blocks, x, cond, cos, sin, mask,
                   per_block=rngs[:len(self.encoder_blocks)], **stack)
    x = self.decoder_embed(self.encoder_norm(x)) + self.decoder_pos_embed_learned[...]
    x = run_blocks(self.decoder_blocks, x, cond, cos, sin, mask,
                   per_block=rngs[len(self.encoder_blocks):], **stack)
    return self.decoder_norm(x) + self.diffusion_pos_embed_learned[...]

  def cached_step(self, k: int, tokens: jax.Array, cond: Condition | jax.Array,
                  caches: list[KVCache] | None) -> tuple[jax.Array, list[KVCache]]:
    """Scale k of the KV-cached pass. tokens `[B, side_k**2, D]` (already embedded), cond (or the class
    embedding `[B, D]`) -> z_k `[B, side_k**2, D]`."""
    start, end = self.schedule.offsets[k], self.schedule.offsets[k + 1]
    cos, sin = (t[start:end] for t in self._rope())
    new_caches = []
    blocks = list(self.encoder_blocks) + list(self.decoder_blocks)
    x = self.z_proj_ln(tokens + self.encoder_pos_embed_learned[:, start:end])
    for i, block in enumerate(blocks):
      if i == len(self.encoder_blocks):
        x = self.decoder_embed(self.encoder_norm(x)) + self.decoder_pos_embed_learned[:, start:end]
      x, cache = block(x, cond, cos, sin, None, cache=None if caches is None else caches[i])
      new_caches.append(cache)
    return self.decoder_norm(x) + self.diffusion_pos_embed_learned[:, start:end], new_caches

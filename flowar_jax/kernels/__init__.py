"""Scale-causal attention: a jnp reference, Pallas kernels for TPU (Mosaic) and GPU (Triton) with a block
mask described by scale boundaries, and one dispatch point (`scale_causal_attention`, `decode_attention`)."""
from flowar_jax.kernels.api import IMPLS, decode_attention, resolve_impl, scale_causal_attention
from flowar_jax.kernels.flash import BlockSizes
from flowar_jax.kernels.mask import ScaleCausalMask
from flowar_jax.kernels.reference import reference_attention

__all__ = ["IMPLS", "BlockSizes", "ScaleCausalMask", "decode_attention", "reference_attention", "resolve_impl",
           "scale_causal_attention"]

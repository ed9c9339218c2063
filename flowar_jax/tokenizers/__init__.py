"""Image tokenizers: VAR's multi-scale residual VQVAE."""
from flowar_jax.tokenizers.msvq import PATCH_NUMS, MultiScaleVQVAE, VectorQuantizer, phi_index

__all__ = ["PATCH_NUMS", "MultiScaleVQVAE", "VectorQuantizer", "phi_index"]

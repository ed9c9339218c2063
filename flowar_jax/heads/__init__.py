"""Output heads' sampling rules: VAR's categorical head."""
from flowar_jax.heads.categorical import (CategoricalSampling, filter_top_k_top_p, guided_logits, gumbel_softmax,
                                          sample_from_uniform, sample_scale, smoothing_temperature)

__all__ = ["CategoricalSampling", "filter_top_k_top_p", "guided_logits", "gumbel_softmax", "sample_from_uniform",
           "sample_scale", "smoothing_temperature"]

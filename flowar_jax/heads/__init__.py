"""Output heads behind the head seam (`heads.base.Head`): VAR's categorical head and the flow head's sampling."""
from flowar_jax.heads.categorical import (CategoricalHead, CategoricalSampling, filter_top_k_top_p, guided_logits,
                                          gumbel_softmax, sample_from_uniform, sample_scale, smoothing_temperature)

__all__ = ["CategoricalHead", "CategoricalSampling", "filter_top_k_top_p", "guided_logits", "gumbel_softmax",
           "sample_from_uniform", "sample_scale", "smoothing_temperature"]

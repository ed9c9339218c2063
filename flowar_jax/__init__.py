"""flowar_jax: next-scale autoregressive image generation with flow-matching heads (FlowAR) in JAX/Flax NNX."""

__version__ = "0.1.0"

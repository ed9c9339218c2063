"""The browser demo behind `python -m flowar_jax serve`: a page, a JSON grid request, and one sampler queue."""

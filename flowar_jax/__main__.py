from flowar_jax.cli import run

run()

"""Learning rate x transformer width on the VAR digits preset: 6 full runs (tokenizer and VAR), each about as
long as a FlowAR digits run on a 2-core CPU.

  python launch/sweep.py configs/sweeps/var_digits_lr.py --workdir runs/var_digits_lr
"""
from flowar_jax.sweeps import Sweep


def get_sweep():
  return Sweep(
      config="configs/var_digits.py",
      grid={"optimizer.base_lr": [2e-3, 4e-3, 8e-3], "model.width": [64, 128]},
      fixed={"sample_every_steps": 0})

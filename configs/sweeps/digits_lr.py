"""Learning rate x backbone width on the digits default: 6 full digits runs (about 8 minutes each on a
2-core CPU; `--parallel` runs several at once on a bigger machine).

  python launch/sweep.py configs/sweeps/digits_lr.py --workdir runs/digits_lr
"""
from flowar_jax.sweeps import Sweep


def get_sweep():
  return Sweep(
      config="configs/digits.py",
      grid={"optimizer.base_lr": [2e-3, 4e-3, 8e-3], "model.width": [64, 128]},
      fixed={"sample_every_steps": 0})

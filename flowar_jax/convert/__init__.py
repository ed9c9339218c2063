"""Reading official PyTorch FlowAR and MAR KL-16 VAE checkpoints into flowar_jax workdirs."""
from flowar_jax.convert.state_dict import load_state_dict, read_checkpoint, select_weights
from flowar_jax.convert.workdir import converted_config, flowar_params, vae_params, write_workdir

__all__ = ["load_state_dict", "read_checkpoint", "select_weights", "converted_config", "flowar_params",
           "vae_params", "write_workdir"]

"""Scale schedule, PyTorch-matching resizes and the scale pyramid: the one place that knows the scales."""
from flowar_jax.scales.pyramid import next_scale_input, scale_targets, teacher_forcing_inputs
from flowar_jax.scales.resize import area_resize, bicubic_resize
from flowar_jax.scales.schedule import ScaleSchedule

__all__ = ["ScaleSchedule", "area_resize", "bicubic_resize", "next_scale_input", "scale_targets",
           "teacher_forcing_inputs"]

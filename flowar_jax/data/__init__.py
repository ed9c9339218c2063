"""Input data: datasets as random-access sources, and grain pipelines that batch and augment them."""
from flowar_jax.data.digits import load_digits_split
from flowar_jax.data.pipeline import make_eval_batches
from flowar_jax.data.pipeline import make_train_iterator
from flowar_jax.data.pipeline import steps_per_epoch
from flowar_jax.data.source import DATASET_NAMES
from flowar_jax.data.source import ImageSource
from flowar_jax.data.source import build_source
from flowar_jax.data.source import num_classes

__all__ = [
    "DATASET_NAMES",
    "ImageSource",
    "build_source",
    "load_digits_split",
    "make_eval_batches",
    "make_train_iterator",
    "num_classes",
    "steps_per_epoch",
]

"""Evaluation: the FID Inception suite (FID, sFID, IS, precision/recall, as ADM's evaluator computes them) and
a download-free metric for the bundled digits. See docs/evaluation.md."""
from flowar_jax.evaluation.frechet import feature_statistics
from flowar_jax.evaluation.frechet import frechet_distance
from flowar_jax.evaluation.frechet import frechet_distance_to_features
from flowar_jax.evaluation.metrics import inception_score
from flowar_jax.evaluation.metrics import manifold_radii
from flowar_jax.evaluation.metrics import precision_recall

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_to_features",
    "inception_score",
    "manifold_radii",
    "precision_recall",
]

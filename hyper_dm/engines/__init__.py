"""Ignite engines and handlers: training, validation/inference, TensorBoard panels, case writing."""

from .evaluator import OUTPUT_KEYS, HyperDiffusionEvaluator
from .metrics import item_means
from .panels import UncertaintyPanelHandler, panel_image
from .trainer import HyperDiffusionTrainer

__all__ = [
    "OUTPUT_KEYS",
    "HyperDiffusionEvaluator",
    "HyperDiffusionTrainer",
    "UncertaintyPanelHandler",
    "item_means",
    "panel_image",
]

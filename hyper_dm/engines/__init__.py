"""Ignite engines and handlers: training, validation/inference, checkpoints, TensorBoard panels, case writing."""

from .checkpoint import AtomicCheckpointSaver, CheckpointLoader, check_config, read_checkpoint
from .evaluator import HyperDiffusionEvaluator
from .metrics import CalibrationScore, SliceMean
from .panels import UncertaintyPanelHandler, panel_image
from .previews import write_preview
from .random_state import RNGState
from .trainer import HyperDiffusionTrainer
from .writer import CaseWriter

__all__ = [
    "AtomicCheckpointSaver",
    "CalibrationScore",
    "CaseWriter",
    "CheckpointLoader",
    "HyperDiffusionEvaluator",
    "HyperDiffusionTrainer",
    "RNGState",
    "UncertaintyPanelHandler",
    "SliceMean",
    "check_config",
    "panel_image",
    "read_checkpoint",
    "write_preview",
]

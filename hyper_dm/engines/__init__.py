"""Ignite engines and handlers: training, validation/inference, checkpoints, TensorBoard panels, case writing."""

from .checkpoint import (
    AtomicCheckpointSaver,
    CheckpointLoader,
    check_config,
    claim_training_folder,
    read_checkpoint,
    write_ensemble,
)
from .distributed import ReplicaCheck, from_rank0, gather, parameter_digest, rank_and_world, unwrap
from .evaluator import HyperDiffusionEvaluator
from .metrics import CalibrationScore, SliceMean
from .panels import UncertaintyPanelHandler, panel_image
from .previews import write_preview
from .random_state import RNGState
from .trainer import GradScalerState, HyperDiffusionTrainer, refuse_ensemble
from .writer import CaseWriter

__all__ = [
    "AtomicCheckpointSaver",
    "CalibrationScore",
    "CaseWriter",
    "CheckpointLoader",
    "HyperDiffusionEvaluator",
    "GradScalerState",
    "HyperDiffusionTrainer",
    "RNGState",
    "ReplicaCheck",
    "UncertaintyPanelHandler",
    "SliceMean",
    "check_config",
    "claim_training_folder",
    "from_rank0",
    "gather",
    "panel_image",
    "parameter_digest",
    "rank_and_world",
    "read_checkpoint",
    "refuse_ensemble",
    "unwrap",
    "write_ensemble",
    "write_preview",
]

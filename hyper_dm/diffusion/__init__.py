"""Schedules, the M x N DDIM sampler, and the training objectives."""

from .inferer import HyperDiffusionInferer
from .losses import MODES, LossConfig, training_loss
from .sampler import HyperDDIMSampler, SampleResult
from .schedule import PREDICTION_TYPES, SPACINGS, ddim_timesteps, make_ddim, make_ddpm, to_x0, training_target

__all__ = [
    "MODES",
    "PREDICTION_TYPES",
    "SPACINGS",
    "HyperDDIMSampler",
    "HyperDiffusionInferer",
    "LossConfig",
    "SampleResult",
    "ddim_timesteps",
    "make_ddim",
    "make_ddpm",
    "to_x0",
    "training_loss",
    "training_target",
]

"""Backbones, the HyperNetwork, and evaluation of M generated weight sets."""

from .backbone import ConditionalMLP, ConditionalUNet, noise_level, timestep_embedding
from .functional import METHODS, apply_weight_sets
from .hypernet import HyperNetwork

__all__ = ["ConditionalMLP", "ConditionalUNet", "HyperNetwork", "METHODS", "apply_weight_sets", "noise_level",
           "timestep_embedding"]

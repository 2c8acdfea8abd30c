"""Backbones, the HyperNetwork (and the deep-ensemble baseline), and evaluation of M generated weight sets."""

from .backbone import ConditionalMLP, ConditionalUNet, noise_level, timestep_embedding
from .ensemble import DeepEnsemble, hyper_network
from .functional import METHODS, apply_weight_sets
from .hypernet import HyperNetwork

__all__ = ["ConditionalMLP", "ConditionalUNet", "DeepEnsemble", "HyperNetwork", "METHODS", "apply_weight_sets",
           "hyper_network", "noise_level", "timestep_embedding"]

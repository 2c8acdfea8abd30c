"""Backbones, the HyperNetwork (and the deep-ensemble baseline), and evaluation of M generated weight sets."""

from .backbone import ConditionalMLP, ConditionalUNet, noise_level, timestep_embedding
from .ensemble import DeepEnsemble, hyper_network
from .functional import METHODS, apply_weight_sets
from .hypernet import WEIGHT_DRAWS, HyperNetwork, balance_latents

__all__ = ["ConditionalMLP", "ConditionalUNet", "DeepEnsemble", "HyperNetwork", "METHODS", "WEIGHT_DRAWS",
           "apply_weight_sets", "balance_latents", "hyper_network", "noise_level", "timestep_embedding"]

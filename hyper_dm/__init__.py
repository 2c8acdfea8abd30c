"""Hyper-DM: Hyper-Diffusion Models for reconstruction with epistemic and aleatoric uncertainty."""

__version__ = "0.1.0"

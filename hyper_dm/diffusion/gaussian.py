"""Closed-form denoiser for Gaussian data: the reference against which the sampler is checked.

For ``x0 ~ N(mu, s^2)`` and ``x_t = sqrt(a) x0 + sqrt(1 - a) eps``, the exact x0 predictor is
``E[x0 | x_t] = mu + sqrt(a) s^2 / (a s^2 + 1 - a) * (x_t - sqrt(a) mu)``. An exact sampler fed with it
returns samples with mean ``mu`` and standard deviation ``s``; DDIM with few steps returns less spread.
"""

from __future__ import annotations

import torch
from torch import nn

from .sampler import HyperDDIMSampler
from .schedule import make_ddim

__all__ = ["GaussianDenoiser", "spread_ratio"]


class GaussianDenoiser(nn.Module):
    """Exact ``E[x0 | x_t]`` for ``x0 ~ N(mu, s^2)`` (``prediction_type="sample"``); ``gain`` (1) is a parameter
    so that HyperNetwork-style weight dicts ``{"gain": [M, 1]}`` apply to it."""

    def __init__(self, alphas_cumprod: torch.Tensor, mu: float, s: float) -> None:
        super().__init__()
        self.alphas_cumprod, self.mu, self.s = alphas_cumprod, mu, s
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t].view(-1, *[1] * (x_t.ndim - 1)).to(x_t)
        shrink = a.sqrt() * self.s**2 / (a * self.s**2 + 1 - a)
        return self.mu + self.gain * shrink * (x_t - a.sqrt() * self.mu)


def spread_ratio(
    steps: int, spacing: str, eta: float = 0.0, mu: float = 0.3, s: float = 0.2, n_draws: int = 8, seed: int = 0
) -> tuple[float, float]:
    """``(mean, std / s)`` of DDIM samples drawn with the exact denoiser (``n_draws x 64 x 64`` values)."""
    scheduler = make_ddim(prediction_type="sample")
    sampler = HyperDDIMSampler(scheduler, steps=steps, eta=eta, spacing=spacing, clip=None)
    result = sampler.sample(
        GaussianDenoiser(scheduler.alphas_cumprod, mu, s), {"gain": torch.ones(1, 1)}, torch.zeros(1, 1, 64, 64),
        n_draws, torch.Generator().manual_seed(seed), keep_samples=True,
    )
    return result.samples.mean().item(), (result.samples.std() / s).item()

"""The 1-D toy problem of the Hyper-DM paper: where the uncertainty must come out.

``x ~ U(-pi, pi)`` with the gap ``|x| < 1`` removed from training; ``y = sin(x) + noise`` with noise
variance 0 for ``x < 0`` rising linearly to ``0.04`` at ``x = pi``. The model sees ``x / pi`` and ``y / 1.6``
(both within [-1, 1]). A HyperNetwork over a small MLP denoiser learns ``p(y | x)``; M x N sampling should
give high EU in the gap (no training data) and AU tracking the noise variance where ``x > 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .diffusion import HyperDDIMSampler, LossConfig, make_ddim, make_ddpm, training_loss
from .networks import ConditionalMLP, HyperNetwork
from .uncertainty import Decomposition

__all__ = ["X_SCALE", "Y_SCALE", "ToyConfig", "noise_variance", "sample_toy", "train_toy", "predict_toy", "toy_figures"]

X_SCALE, Y_SCALE = math.pi, 1.6
GAP = 1.0
MAX_NOISE_VAR = 0.04


def noise_variance(x: torch.Tensor) -> torch.Tensor:
    """True noise variance of ``y`` at raw ``x`` (unscaled units)."""
    return MAX_NOISE_VAR * (x / math.pi).clamp_min(0.0)


def sample_toy(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training pairs in model units: ``x [n, 1]`` (= x / pi), ``y [n, 1]`` (= y / 1.6); gap excluded."""
    x = torch.empty(0)
    while x.numel() < n:
        draw = (torch.rand(2 * n, generator=generator) * 2 - 1) * math.pi
        x = torch.cat([x, draw[draw.abs() >= GAP]])
    x = x[:n]
    y = torch.sin(x) + noise_variance(x).sqrt() * torch.randn(n, generator=generator)
    return (x / X_SCALE).unsqueeze(1), (y / Y_SCALE).unsqueeze(1)


@dataclass
class ToyConfig:
    mode: str = "standard"
    steps: int = 3000
    batch_size: int = 256
    lr: float = 2e-3
    z_dim: int = 8
    rank: int = 4
    offset_scale: float = 1.5
    hidden: int = 128
    m_weights: int = 4
    lambda_eu: float = 0.01
    prediction_type: str = "v_prediction"
    seed: int = 0


def train_toy(config: ToyConfig) -> tuple[HyperNetwork, ConditionalMLP, list[float]]:
    """Train a HyperNetwork over an MLP denoiser on the toy; returns it with the per-step MSE curve.

    The toy predicts ``v`` by default: an x0-predicting MLP fits the conditional mean well but learns the
    near-identity map at small ``t`` poorly (slope 0.2 instead of 1 after 3000 steps), which collapses the
    DDIM spread and with it AU.
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    backbone = ConditionalMLP(data_dim=1, cond_dim=1, hidden=config.hidden, depth=3)
    hyper = HyperNetwork(
        backbone, z_dim=config.z_dim, hidden=64, rank=config.rank, offset_scale=config.offset_scale
    )
    scheduler = make_ddpm(prediction_type=config.prediction_type)
    loss_config = LossConfig(mode=config.mode, m_weights=config.m_weights, lambda_eu=config.lambda_eu)
    optimizer = torch.optim.Adam(hyper.trainable_parameters(), lr=config.lr)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    losses = []
    for _ in range(config.steps):
        x, y = sample_toy(config.batch_size, generator)
        out = training_loss(hyper, backbone, scheduler, y, x, loss_config, generator)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        lr_schedule.step()
        losses.append(out["mse"].item())
    return hyper, backbone, losses


@torch.no_grad()
def predict_toy(
    hyper: HyperNetwork, backbone: ConditionalMLP, x: torch.Tensor, m: int = 16, n: int = 32, steps: int = 50,
    seed: int = 1, prediction_type: str = "v_prediction",
) -> Decomposition:
    """M x N DDIM statistics at raw ``x [K]``; returned in raw ``y`` units (variances times ``Y_SCALE^2``)."""
    generator = torch.Generator().manual_seed(seed)
    weights = hyper(hyper.sample_z(m, generator))
    sampler = HyperDDIMSampler(make_ddim(prediction_type=prediction_type), steps=steps, eta=0.0, clip=(-1.0, 1.0))
    stats = sampler.sample(backbone, weights, (x / X_SCALE).unsqueeze(1), n, generator).stats
    return Decomposition(mean=stats.mean * Y_SCALE, eu=stats.eu * Y_SCALE**2, au=stats.au * Y_SCALE**2)


def toy_figures(stats: Decomposition, x: torch.Tensor) -> dict[str, float]:
    """What the method promises, measured at raw ``x [K]``.

    ``eu_gap_ratio``: mean EU in the gap over mean EU on the noise-free training side (``x < -1``);
    ``au_rank_corr``: Spearman correlation of AU with the true noise variance on ``x > 1``;
    ``au_magnitude``: mean AU over mean true noise variance on ``x > 1`` (1 = calibrated).
    """
    eu, au = stats.eu.flatten(), stats.au.flatten()
    gap, clean, noisy = x.abs() < GAP, x < -GAP, x > GAP
    true_var = noise_variance(x[noisy])
    rank = lambda v: v.argsort().argsort().double()  # noqa: E731
    rho = torch.corrcoef(torch.stack([rank(au[noisy]), rank(true_var)]))[0, 1]
    return {
        "eu_gap_ratio": (eu[gap].mean() / eu[clean].mean()).item(),
        "au_rank_corr": rho.item(),
        "au_magnitude": (au[noisy].mean() / true_var.mean()).item(),
        "mean_rmse": (stats.mean.flatten()[~gap] - torch.sin(x[~gap])).pow(2).mean().sqrt().item(),
    }

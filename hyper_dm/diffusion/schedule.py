"""Noise schedules (MONAI schedulers) and DDIM timestep selection.

Training uses MONAI's ``DDPMScheduler`` (forward process, ``T`` steps, linear betas). Sampling uses the
``alphas_cumprod`` of MONAI's ``DDIMScheduler`` built with the same betas, but with explicit
``(t, t_prev)`` pairs: in MONAI 1.6.1 ``DDIMScheduler.set_timesteps`` and ``step`` disagree on the
previous timestep, so :func:`ddim_timesteps` chooses the pairs and the sampler uses them consistently.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

__all__ = ["PREDICTION_TYPES", "SPACINGS", "make_ddpm", "make_ddim", "ddim_timesteps", "to_x0", "training_target"]

PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")
SPACINGS = ("linear", "quadratic")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def make_ddpm(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2, prediction_type: str = "sample"
) -> DDPMScheduler:
    """MONAI DDPM scheduler with linear betas: the training forward process ``q(x_t | x_0)``."""
    return _linear_beta(DDPMScheduler, num_train_timesteps, beta_start, beta_end, prediction_type)


def make_ddim(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2, prediction_type: str = "sample"
) -> DDIMScheduler:
    """MONAI DDIM scheduler sharing the training betas (its ``alphas_cumprod`` drive the sampler)."""
    return _linear_beta(DDIMScheduler, num_train_timesteps, beta_start, beta_end, prediction_type)


def _linear_beta(cls: type, num_train_timesteps: int, beta_start: float, beta_end: float, prediction_type: str):
    _check_prediction_type(prediction_type)
    return cls(num_train_timesteps=num_train_timesteps, schedule="linear_beta", beta_start=beta_start,
               beta_end=beta_end, prediction_type=prediction_type)


def ddim_timesteps(num_train_timesteps: int, steps: int, spacing: Literal["linear", "quadratic"]) -> list[int]:
    """Descending, distinct timesteps from ``T - 1`` down to 0 for ``steps`` DDIM updates.

    ``linear`` spaces them evenly; ``quadratic`` places ``t_k = (T - 1) (k / (steps - 1))^2``, dense near
    ``t = 0`` where the fine detail (and the posterior spread) is decided.

    Example:
        >>> ddim_timesteps(1000, 5, "linear")
        [999, 749, 500, 250, 0]
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"ddim_steps must be in [1, {num_train_timesteps}], got {steps}")
    if steps == 1:
        return [num_train_timesteps - 1]
    u = np.linspace(0.0, 1.0, steps)
    t = np.round((num_train_timesteps - 1) * (u if spacing == "linear" else u**2)).astype(int)
    for k in range(1, steps):  # keep them distinct where rounding collides near t = 0
        t[k] = max(t[k], t[k - 1] + 1)
    t = np.minimum(t, num_train_timesteps - 1 - np.arange(steps)[::-1])
    return [int(v) for v in t[::-1]]


def to_x0(
    output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor | float, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Network ``output`` at noise level ``alpha_bar`` (a float or a broadcastable tensor) -> ``(x0_hat, eps_hat)``."""
    a, s = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if prediction_type == "sample":
        x0 = output
    elif prediction_type == "epsilon":
        x0 = (x_t - s * output) / a
    elif prediction_type == "v_prediction":
        x0 = a * x_t - s * output
    else:
        _check_prediction_type(prediction_type)
    return x0, (x_t - a * x0) / s


def training_target(
    scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What the network regresses for ``scheduler.prediction_type``: ``x0``, the noise, or ``v``."""
    if scheduler.prediction_type == "sample":
        return x0
    if scheduler.prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(x0, noise, t)

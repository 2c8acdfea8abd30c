"""M x N DDIM sampling: M generated weight sets, N draws each, statistics streamed.

One DDIM update (Song et al., 2021) from ``t`` to ``t_prev`` with ``a = alpha_bar_t``, ``a' = alpha_bar_t_prev``
(``a' = 1`` after the last step)::

    sigma  = eta * sqrt((1 - a') / (1 - a)) * sqrt(1 - a / a')
    x_prev = sqrt(a') x0_hat + sqrt(1 - a' - sigma^2) eps_hat + sigma * noise

``x0_hat`` is clipped to the data range before ``eps_hat`` is recomputed from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from monai.networks.schedulers import DDIMScheduler
from torch import nn

from ..networks.functional import apply_weight_sets
from ..uncertainty import Decomposition, UncertaintyAccumulator
from .schedule import ddim_timesteps, to_x0

__all__ = ["HyperDDIMSampler", "SampleResult"]


@dataclass
class SampleResult:
    """``stats``: mean/EU/AU ``[B, C, *spatial]``; ``samples``: raw ``[M, N, B, C, *spatial]`` if requested."""

    stats: Decomposition
    samples: torch.Tensor | None = None


class HyperDDIMSampler:
    """DDIM sampler over M weight sets x N draws for a batch of B conditions.

    Each DDIM step runs the backbone once per weight set on all ``n * B`` draws of a chunk (or once in
    total with ``method="vmap"``), so a full run costs ``steps * M * ceil(N / chunk)`` network calls.
    Statistics are streamed over chunks (Welford), so memory follows ``chunk``, not ``N``.

    Args:
        scheduler: MONAI ``DDIMScheduler`` whose ``alphas_cumprod`` and ``prediction_type`` are used.
        steps: number of DDIM updates (``ddim_steps``).
        eta: 0 for deterministic DDIM, 1 for DDPM-like ancestral noise.
        spacing: ``"linear"`` or ``"quadratic"`` timestep spacing (see :func:`ddim_timesteps`).
        clip: data range ``(lo, hi)`` that ``x0_hat`` is clipped to, or ``None``.
        method: ``"loop"`` or ``"vmap"`` evaluation of the weight sets.
        chunk: draws per chunk (``None``: all ``N`` at once).
    """

    def __init__(
        self,
        scheduler: DDIMScheduler,
        steps: int = 20,
        eta: float = 0.0,
        spacing: Literal["linear", "quadratic"] = "quadratic",
        clip: tuple[float, float] | None = (-1.0, 1.0),
        method: Literal["loop", "vmap"] = "loop",
        chunk: int | None = None,
    ) -> None:
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1 or None, got {chunk}")
        self.alphas_cumprod = scheduler.alphas_cumprod.double()
        self.prediction_type = scheduler.prediction_type
        self.timesteps = ddim_timesteps(len(self.alphas_cumprod), steps, spacing)
        self.eta, self.clip, self.method, self.chunk = eta, clip, method, chunk

    @torch.no_grad()
    def sample(
        self,
        backbone: nn.Module,
        weights: dict[str, torch.Tensor],
        cond: torch.Tensor,
        n_draws: int,
        generator: torch.Generator | None = None,
        keep_samples: bool = False,
        channels: int | None = None,
    ) -> SampleResult:
        """Draw ``n_draws`` samples per weight set for ``cond [B, C_cond, *spatial]``.

        ``weights`` is a HyperNetwork output (``name -> [M, *shape]``); ``channels`` is the sample's
        channel count (default: that of ``cond``). ``generator`` (CPU or on ``cond``'s device) makes the
        draws reproducible.
        """
        if n_draws < 1:
            raise ValueError(f"n_draws must be >= 1, got {n_draws}")
        m = next(iter(weights.values())).shape[0]
        sample_shape = (cond.shape[1] if channels is None else channels, *cond.shape[2:])
        accumulator, kept = UncertaintyAccumulator(), []
        chunk = n_draws if self.chunk is None else self.chunk
        for start in range(0, n_draws, chunk):
            n = min(chunk, n_draws - start)
            draws = self._sample_chunk(backbone, weights, cond, m, n, sample_shape, generator)  # [M, n, B, ...]
            accumulator.update(draws)
            if keep_samples:
                kept.append(draws.cpu())
        return SampleResult(accumulator.result(cond.dtype), torch.cat(kept, dim=1) if keep_samples else None)

    def _randn(self, shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
        device = generator.device if generator is not None else like.device
        return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)

    def _sample_chunk(self, backbone, weights, cond, m, n, sample_shape, generator) -> torch.Tensor:
        b = cond.shape[0]
        cond_rep = cond.unsqueeze(0).unsqueeze(0).expand(m, n, *cond.shape).reshape(m, n * b, *cond.shape[1:])
        x = self._randn((m, n * b, *sample_shape), generator, cond)
        alphas = self.alphas_cumprod.to(cond.device)
        for k, t in enumerate(self.timesteps):
            a = alphas[t]
            a_prev = alphas[self.timesteps[k + 1]] if k + 1 < len(self.timesteps) else torch.ones_like(a)
            t_batch = torch.full((m, n * b), t, device=cond.device, dtype=torch.long)
            output = apply_weight_sets(backbone, weights, x, t_batch, cond_rep, self.method)
            x0, eps = to_x0(output.double(), x.double(), a, self.prediction_type)
            if self.clip is not None:
                x0 = x0.clamp(*self.clip)
                eps = (x.double() - a.sqrt() * x0) / (1 - a).sqrt()
            sigma = self.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp_min(0).sqrt()
            x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps
            if self.eta > 0 and k + 1 < len(self.timesteps):
                x_prev = x_prev + sigma * self._randn(tuple(x.shape), generator, x).double()
            x = x_prev.to(cond.dtype)
        return x.reshape(m, n, b, *sample_shape)

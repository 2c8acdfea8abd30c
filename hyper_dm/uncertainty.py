"""Uncertainty decomposition and metrics for M weight sets x N draws.

Samples ``x[i, j]`` (``i`` over weight sets, ``j`` over diffusion draws) give, per pixel, estimates of the two parts
of the predictive variance (law of total variance, ``Var x = Var_i E_j x + E_i Var_j x``)::

    mean  = mean_ij x
    AU    = mean_i(Var_j x)                                  # aleatoric: the posterior spread of one weight set
    EU    = max(0, Var_i(mean_j x) - mean_j(Var_i d) / N)    # epistemic: disagreement between weight sets
    total = EU + AU                                          # d[i, j] = x[i, j] - mean_j x[i, j]

Variances divide by ``count - 1``. The N-draw mean of one weight set carries Monte Carlo noise besides the set's
own answer; only the part of that noise that differs between weight sets inflates ``Var_i(mean_j x)``, and
``mean_j(Var_i d) / N`` estimates it (with ``N - 1`` in the mean over draws, so the difference is unbiased).
The sampler gives every weight set the same noise for draw ``j`` (common random numbers), so most of the Monte
Carlo noise is shared and cancels: EU then converges at small N, and the clamp at zero, which turns leftover noise
into positive EU, barely biases it. With independent noise per set the correction equals ``AU / N`` (in
expectation), the classical one. With ``M = 1`` EU is 0, with ``N = 1`` AU is 0 and EU holds the whole spread
(neither can be estimated; callers warn). Variances are in squared image units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.metrics import PSNRMetric, SSIMMetric

__all__ = [
    "Decomposition",
    "UncertaintyAccumulator",
    "central_z",
    "decompose",
    "psnr",
    "ssim",
    "crps",
    "sparsification_curves",
    "ause",
    "uce",
    "coverage",
    "gaussian_crps",
    "gaussian_coverage",
]


@dataclass
class Decomposition:
    """Per-pixel statistics, each shaped like one sample ``[B, C, H, W]``."""

    mean: torch.Tensor
    eu: torch.Tensor
    au: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.eu + self.au


def decompose(samples: torch.Tensor) -> Decomposition:
    """Decompose raw samples ``[M, N, *shape]`` into mean, EU and AU (see module docstring)."""
    if samples.ndim < 3:
        raise ValueError(f"samples must be [M, N, *shape], got shape {tuple(samples.shape)}")
    set_means = samples.mean(dim=1)  # [M, *shape]
    draw_means = samples.mean(dim=0)  # [N, *shape]
    return _combine(set_means, (samples - set_means.unsqueeze(1)).pow(2).sum(dim=1),
                    (draw_means - draw_means.mean(dim=0)).pow(2).sum(dim=0), samples.shape[1])


def _combine(set_means: torch.Tensor, squares: torch.Tensor, draw_squares: torch.Tensor, n: int) -> Decomposition:
    """The decomposition from per-set means ``[M, *shape]``, per-set sums of squared deviations ``[M, *shape]`` over
    ``n`` draws, and the sum over draws of squared deviations of the per-draw means across sets ``[*shape]``."""
    m = set_means.shape[0]
    au = squares.mean(dim=0) / (n - 1) if n > 1 else torch.zeros_like(set_means[0])
    if m == 1:
        eu = torch.zeros_like(set_means[0])
    elif n == 1:
        eu = set_means.var(dim=0)
    else:  # sum_ij (d_ij - mean_i d_ij)^2 = sum_i squares_i - M * draw_squares
        noise = (squares.sum(dim=0) - m * draw_squares) / ((m - 1) * (n - 1) * n)
        eu = (set_means.var(dim=0) - noise).clamp_min(0)
    return Decomposition(mean=set_means.mean(dim=0), eu=eu, au=au)


class UncertaintyAccumulator:
    """Streaming version of :func:`decompose`: memory ``O(M * pixels)`` whatever the number of draws.

    Call :meth:`update` with chunks of draws ``[M, n, *shape]`` (Chan et al.'s parallel Welford merge,
    in float64), then :meth:`result`. Every weight set must receive the same number of draws.
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: torch.Tensor | None = None  # [M, *shape]
        self._m2: torch.Tensor | None = None  # [M, *shape] sum of squared deviations
        self._draw_mean: torch.Tensor | None = None  # [*shape] mean over draws of the mean across sets
        self._draw_m2: torch.Tensor | None = None  # [*shape] its sum of squared deviations over draws

    def update(self, draws: torch.Tensor) -> None:
        draws = draws.detach().double()
        if self._mean is not None and (draws.shape[0] != self._mean.shape[0]
                                       or draws.shape[2:] != self._mean.shape[1:]):
            raise ValueError(f"chunk shape {tuple(draws.shape)} does not match earlier chunks")
        n = draws.shape[1]
        set_mean, per_draw = draws.mean(dim=1), draws.mean(dim=0)  # [M, *shape], [n, *shape]
        set_m2 = (draws - set_mean.unsqueeze(1)).pow(2).sum(dim=1)
        draw_mean = per_draw.mean(dim=0)
        draw_m2 = (per_draw - draw_mean).pow(2).sum(dim=0)
        if self._mean is None:
            self.count, self._mean, self._m2, self._draw_mean, self._draw_m2 = n, set_mean, set_m2, draw_mean, draw_m2
            return
        self._mean, self._m2 = _merge(self._mean, self._m2, self.count, set_mean, set_m2, n)
        self._draw_mean, self._draw_m2 = _merge(self._draw_mean, self._draw_m2, self.count, draw_mean, draw_m2, n)
        self.count += n

    def result(self, dtype: torch.dtype = torch.float32) -> Decomposition:
        if self._mean is None:
            raise RuntimeError("no draws accumulated")
        d = _combine(self._mean, self._m2, self._draw_m2, self.count)
        return Decomposition(mean=d.mean.to(dtype), eu=d.eu.to(dtype), au=d.au.to(dtype))


def _merge(mean: torch.Tensor, m2: torch.Tensor, count: int, chunk_mean: torch.Tensor, chunk_m2: torch.Tensor,
           n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chan et al.'s merge of two (mean, sum of squared deviations) summaries of ``count`` and ``n`` values."""
    delta = chunk_mean - mean
    return mean + delta * (n / (count + n)), m2 + chunk_m2 + delta.pow(2) * (count * n / (count + n))


def psnr(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR in dB per batch item (MONAI ``PSNRMetric``); images ``[B, C, H, W]``, ``data_range`` in image units."""
    return PSNRMetric(max_val=data_range, reduction="none")(prediction, target).flatten()


def ssim(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """SSIM per batch item (MONAI ``SSIMMetric``, 2-D, Gaussian window); images ``[B, C, H, W]``."""
    metric = SSIMMetric(spatial_dims=2, data_range=data_range, reduction="none", win_size=7)
    return metric(prediction, target).flatten()


def crps(samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Continuous ranked probability score per pixel from samples ``[S, *shape]``: ``E|X-y| - E|X-X'|/2``.

    Uses the sorted-sample identity ``E|X-X'| = 2/S^2 * sum_k (2k - S - 1) x_(k)`` (``O(S log S)``);
    lower is better, in image units. Returns ``[*shape]``.
    """
    s = samples.shape[0]
    ordered = samples.sort(dim=0).values
    k = torch.arange(1, s + 1, device=samples.device, dtype=samples.dtype).view(-1, *[1] * (samples.ndim - 1))
    spread = (2.0 / s**2) * ((2 * k - s - 1) * ordered).sum(dim=0)
    return (samples - target).abs().mean(dim=0) - 0.5 * spread


def sparsification_curves(
    uncertainty: torch.Tensor, error: torch.Tensor, n_steps: int = 20
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparsification curves: mean ``error`` of the pixels left after removing the most uncertain fraction.

    Returns ``(fractions [n_steps], by_uncertainty [n_steps], oracle [n_steps])``; both curves are
    normalised by the mean error of all pixels (the oracle removes the largest errors first).
    """
    error = error.flatten().double()
    by_unc = error[uncertainty.flatten().argsort(descending=True)]
    by_err = error.sort(descending=True).values
    fractions = torch.arange(n_steps, dtype=torch.float64) / n_steps
    starts = (fractions * error.numel()).long()
    norm = error.mean().clamp_min(torch.finfo(torch.float64).tiny)
    curve = lambda ordered: torch.stack([ordered[s:].mean() for s in starts]) / norm  # noqa: E731
    return fractions, curve(by_unc), curve(by_err)


def ause(uncertainty: torch.Tensor, error: torch.Tensor, n_steps: int = 20) -> float:
    """Area Under the Sparsification Error (normalised): 0 when uncertainty ranks errors perfectly."""
    fractions, by_unc, oracle = sparsification_curves(uncertainty, error, n_steps)
    return float((by_unc - oracle).mean())


def uce(variance: torch.Tensor, squared_error: torch.Tensor, n_bins: int = 10) -> float:
    """Uncertainty calibration error: ``sum_b n_b/n * |mean var_b - mean sq.err_b|`` over variance bins.

    Bins are quantiles of ``variance`` (equal counts); squared image units. 0 for a calibrated variance.
    """
    var = variance.flatten().double()
    err = squared_error.flatten().double()
    order = var.argsort()
    total = 0.0
    for idx in order.tensor_split(n_bins):
        if idx.numel():
            total += idx.numel() / var.numel() * (var[idx].mean() - err[idx].mean()).abs().item()
    return total


def coverage(samples: torch.Tensor, target: torch.Tensor, levels: Sequence[float] = (0.5, 0.9)) -> dict[float, float]:
    """Fraction of pixels whose ``target`` lies in the central ``level`` interval of ``samples [S, *shape]``."""
    result = {}
    for level in levels:
        if not 0.0 < level < 1.0:
            raise ValueError(f"coverage level must be in (0, 1), got {level}")
        q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=samples.dtype, device=samples.device)
        lo, hi = torch.quantile(samples.flatten(1), q, dim=0)
        t = target.flatten()
        result[level] = ((t >= lo) & (t <= hi)).double().mean().item()
    return result


def gaussian_crps(mean: torch.Tensor, variance: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CRPS per pixel of the Gaussian ``N(mean, variance)`` at ``target`` (closed form; image units).

    ``sigma * (z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi))`` with ``z = (target - mean) / sigma``; a zero variance
    gives ``|target - mean|``. All inputs share one shape.
    """
    sigma = variance.double().clamp_min(0).sqrt()
    error = (target - mean).double()
    z = error / sigma.clamp_min(torch.finfo(torch.float64).tiny)
    phi = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    score = sigma * (z * (2 * cdf - 1) + 2 * phi - 1 / math.sqrt(math.pi))
    return torch.where(sigma > 0, score, error.abs())


def central_z(level: float) -> float:
    """The half-width, in standard deviations, of the central ``level`` interval of a Gaussian (0.9: 1.645)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"coverage level must be in (0, 1), got {level}")
    return math.sqrt(2) * torch.erfinv(torch.tensor(level, dtype=torch.float64)).item()


def gaussian_coverage(
    mean: torch.Tensor, variance: torch.Tensor, target: torch.Tensor, levels: Sequence[float] = (0.5, 0.9, 0.95)
) -> dict[float, float]:
    """Fraction of pixels whose ``target`` lies in the central ``level`` interval of ``N(mean, variance)``."""
    error = (target - mean).double().abs()
    sigma = variance.double().clamp_min(0).sqrt()
    return {level: (error <= central_z(level) * sigma).double().mean().item() for level in levels}

"""M x N DDIM sampling: M generated weight sets, N draws each, statistics streamed.

One DDIM update (Song et al., 2021) from ``t`` to ``t_prev`` with ``a = alpha_bar_t``, ``a' = alpha_bar_t_prev``
(``a' = 1`` after the last step)::

    sigma  = eta * sqrt((1 - a') / (1 - a)) * sqrt(1 - a / a')
    x_prev = sqrt(a') x0_hat + sqrt(1 - a' - sigma^2) eps_hat + sigma * noise

``x0_hat`` is clipped to the data range before ``eps_hat`` is recomputed from it. The coefficients are computed
once in float64 on the host; the update itself runs in float32 on the samples' device.

How the M x N x B chains are grouped into network calls decides the speed (``scripts/benchmark.py``): each call
runs one weight set on ``call_batch`` images (all N draws of one or more conditions, or a chunk of draws), and the
chains of one call run all their steps before the next call group starts, so only one group's activations and
states are alive and memory does not grow with N.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

import torch
from monai.networks.schedulers import DDIMScheduler
from torch import nn
from torch.func import functional_call

from ..config import parse_choice
from ..networks.functional import apply_weight_sets
from ..uncertainty import Decomposition, UncertaintyAccumulator
from .schedule import ddim_timesteps, to_x0

__all__ = ["CALL_PIXELS", "HyperDDIMSampler", "Precision", "SampleResult"]

logger = logging.getLogger(__name__)

CALL_PIXELS = {"cpu": {"float32": 64 * 64 * 10, "bfloat16": 64 * 64 * 16, "float16": 64 * 64 * 16},
               "cuda": {"float32": 256 * 256 * 32, "bfloat16": 256 * 256 * 32, "float16": 256 * 256 * 32}}
"""Default pixels per network call by device type and precision (``call_batch = max(1, pixels // image pixels)``).
CPU: the measured optimum of the default U-Net (``scripts/benchmark.py --sweep``, 2 threads of an AMX Xeon:
float32 fastest at 8-16 images of 64^2, 1-2 of 128^2, 1 of 256^2; bfloat16 at 8-32, 4, 1-2; larger batches run
slower per FLOP, their activations leave the cache). CUDA: enough images to keep an H100 busy at 256^2 and up
(float32 activations ~0.3 GiB per 256^2 image: ~9 GiB per call). Other device types use the CUDA figures."""


class Precision(str, Enum):
    """Arithmetic of the network calls (``inference_cfg#precision``): ``float32``, or autocast to ``bfloat16`` (CPUs
    with AVX-512 BF16 / AMX, CUDA) or ``float16`` (CUDA). The DDIM update and the statistics stay float32/64."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @classmethod
    def parse(cls, value: str | Precision) -> Precision:
        return parse_choice(cls, value, "inference_cfg#precision")

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.value)


@dataclass
class SampleResult:
    """``stats``: mean/EU/AU ``[B, C, *spatial]``; ``samples``: raw ``[M, N, B, C, *spatial]`` if requested."""

    stats: Decomposition
    samples: torch.Tensor | None = None


Network = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
"""``(x [G, b, C, *spatial], t, cond [b, C_cond, *spatial]) -> [G, b, C, *spatial]``: G weight sets at once."""


class HyperDDIMSampler:
    """DDIM sampler over M weight sets x N draws for a batch of B conditions.

    With ``method="loop"`` each network call runs one weight set on ``call_batch`` images: ``n`` draws of ``b``
    conditions (all N draws of ``b = call_batch // N`` conditions when ``call_batch >= N``, else at most
    ``call_batch`` draws of one condition, in chunks of equal size). A run costs
    ``steps * M * ceil(N / n) * ceil(B / b)`` calls. ``method="vmap"`` runs all M weight sets in one
    ``torch.func.vmap`` call instead (slower on CPU, see ``scripts/benchmark.py``). Statistics are streamed
    (Welford), so memory follows ``call_batch``, not ``N``.

    Args:
        scheduler: MONAI ``DDIMScheduler`` whose ``alphas_cumprod`` and ``prediction_type`` are used.
        steps: number of DDIM updates (``ddim_steps``).
        eta: 0 for deterministic DDIM, 1 for DDPM-like ancestral noise.
        spacing: ``"linear"`` or ``"quadratic"`` timestep spacing (see :func:`ddim_timesteps`).
        clip: data range ``(lo, hi)`` that ``x0_hat`` is clipped to, or ``None``.
        method: ``"loop"`` or ``"vmap"`` evaluation of the weight sets.
        call_batch: images (draws x conditions) per network call; ``None``: from :data:`CALL_PIXELS`.
        precision: a :class:`Precision` value: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"`` autocast.
        channels_last: run convolutions in NHWC layout (the generated 4-D weights are converted once per call of
            :meth:`sample`; faster for oneDNN and cuDNN convolutions).
        compile: run the backbone through ``torch.compile`` (opt-in: the first call of each batch shape compiles).
        common_noise: draw ``j`` of every weight set starts from the same noise (common random numbers; default).
            EU is then the weight sets' disagreement at any N; the mean averages N independent noises, so its
            Monte Carlo variance is about AU / N. ``False``: independent noise per set (Monte Carlo variance of
            the mean AU / (M N)), and EU carries Monte Carlo noise of order AU / N that the clamp at zero keeps.
    """

    def __init__(
        self,
        scheduler: DDIMScheduler,
        steps: int = 20,
        eta: float = 0.0,
        spacing: Literal["linear", "quadratic"] = "quadratic",
        clip: tuple[float, float] | None = (-1.0, 1.0),
        method: Literal["loop", "vmap"] = "loop",
        call_batch: int | None = None,
        precision: str | Precision = Precision.FLOAT32,
        channels_last: bool = True,
        compile: bool = False,
        common_noise: bool = True,
    ) -> None:
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if call_batch is not None and call_batch < 1:
            raise ValueError(f"call_batch (inference_cfg#call_batch) must be >= 1 or null, got {call_batch}")
        if method not in ("loop", "vmap"):
            raise ValueError(f"unknown evaluation method {method!r}; expected 'loop' or 'vmap'")
        self.prediction_type = scheduler.prediction_type
        self.timesteps = ddim_timesteps(len(scheduler.alphas_cumprod), steps, spacing)
        alphas = scheduler.alphas_cumprod.double()
        a = alphas[self.timesteps]
        a_prev = torch.cat([a[1:], a.new_ones(1)])
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp_min(0).sqrt()
        # per step (t, alpha_bar_t, sqrt(a'), sqrt(1 - a' - sigma^2), sigma) as Python floats: no device syncs
        self.coefficients = [(t, *(float(v) for v in c)) for t, *c in zip(
            self.timesteps, a, a_prev.sqrt(), (1 - a_prev - sigma**2).clamp_min(0).sqrt(), sigma, strict=True)]
        self.eta, self.clip, self.method, self.call_batch = eta, clip, method, call_batch
        self.precision, self.channels_last = Precision.parse(precision), channels_last
        self.common_noise = common_noise
        self._forward = torch.compile(functional_call, dynamic=False) if compile else functional_call
        self._warned = False

    @torch.inference_mode()
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

        ``weights`` is a HyperNetwork output (``name -> [M, *shape]``), computed once by the caller (once per
        volume); ``channels`` is the sample's channel count (default: that of ``cond``). ``generator`` (CPU or on
        ``cond``'s device) makes the draws reproducible: it seeds the noise of each chunk of draws on ``cond``'s
        device (the same draws with ``method`` loop and vmap; no noise crosses from the host while sampling). With
        ``common_noise`` draw ``j`` of every weight set starts from the same noise, so the spread across weight
        sets holds their disagreement rather than Monte Carlo noise (see :mod:`hyper_dm.uncertainty`).
        """
        if n_draws < 1:
            raise ValueError(f"n_draws must be >= 1, got {n_draws}")
        m = next(iter(weights.values())).shape[0]
        if any(w.shape[0] != m for w in weights.values()):
            raise ValueError(f"every weight tensor needs a leading axis of size M={m}")
        sample_shape = (cond.shape[1] if channels is None else channels, *cond.shape[2:])
        if cond.device.type == "cpu" and not self._warned and not _fast_on_cpu(self.precision):
            self._warned = True
            logger.warning("precision %s: this CPU has no native %s matrix units; it runs slower than float32",
                           self.precision.value, self.precision.value)
        networks = self._networks(backbone, weights, m)
        n_call, b_call = self.call_shape(n_draws, cond.shape[0], math.prod(sample_shape), cond.device)
        stats, kept = [], []
        for group in cond.split(b_call):  # [b, C_cond, *spatial]
            accumulator, group_kept = UncertaintyAccumulator(), []
            for start in range(0, n_draws, n_call):
                n = min(n_call, n_draws - start)
                cond_rep = group.repeat(n, *[1] * (group.ndim - 1))  # [n * b, ...], draw-major
                seeds = [_seed(generator)] * m if self.common_noise else [_seed(generator) for _ in range(m)]
                generators = [torch.Generator(cond.device).manual_seed(seed) for seed in seeds]
                draws, first = [], 0
                for net, size in networks:
                    draws.append(self._chain(net, cond_rep, sample_shape, generators[first:first + size]))
                    first += size
                draws = torch.cat(draws)
                draws = draws.reshape(m, n, group.shape[0], *sample_shape)
                accumulator.update(draws)
                if keep_samples:
                    group_kept.append(draws.cpu())
            stats.append(accumulator.result(cond.dtype))
            if keep_samples:
                kept.append(torch.cat(group_kept, dim=1))
        merged = Decomposition(*(torch.cat([getattr(s, k) for s in stats]) for k in ("mean", "eu", "au")))
        return SampleResult(merged, torch.cat(kept, dim=2) if keep_samples else None)

    def call_shape(self, n_draws: int, b: int, pixels: int, device: torch.device) -> tuple[int, int]:
        """``(draws, conditions)`` per network call for ``b`` conditions of ``pixels`` values per image."""
        budget = CALL_PIXELS.get(device.type, CALL_PIXELS["cuda"])[self.precision.value]
        call_batch = self.call_batch or max(1, budget // pixels)
        if call_batch >= n_draws:
            return n_draws, min(b, call_batch // n_draws)
        chunks = -(-n_draws // call_batch)
        return -(-n_draws // chunks), 1  # chunks of equal size: 10 draws at call_batch 8 run as 5 + 5

    def _networks(self, backbone: nn.Module, weights: dict[str, torch.Tensor], m: int) -> list[tuple[Network, int]]:
        """The network calls that together cover the M weight sets, each with how many sets it runs."""
        if self.method == "vmap":
            def vmapped(x, t, cond):
                g, nb = x.shape[:2]
                t_rep = torch.full((g, nb), t, device=x.device, dtype=torch.long)
                return apply_weight_sets(backbone, weights, x, t_rep, cond.expand(g, *cond.shape), "vmap")
            return [(self._autocast(vmapped), m)]

        def one(params):
            def call(x, t, cond):
                t_rep = torch.full((x.shape[1],), t, device=x.device, dtype=torch.long)
                return self._forward(backbone, params, (x[0], t_rep, cond))[None]
            return self._autocast(call)

        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        sets = [{k: w[i].contiguous(memory_format=layout) if w.ndim == 5 else w[i] for k, w in weights.items()}
                for i in range(m)]
        return [(one(params), 1) for params in sets]

    def _autocast(self, net: Network) -> Network:
        """``net`` under this sampler's precision, returning float32."""
        if self.precision is Precision.FLOAT32:
            return net

        def cast(x, t, cond):
            with torch.autocast(x.device.type, dtype=self.precision.dtype):
                return net(x, t, cond).float()
        return cast

    def _chain(self, net: Network, cond: torch.Tensor, sample_shape: tuple[int, ...],
               generators: list[torch.Generator]) -> torch.Tensor:
        """All DDIM steps of ``g = len(generators)`` weight sets (one noise generator each, equally seeded) on
        ``cond [nb, ...]`` from fresh noise: ``[g, nb, *sample_shape]``."""
        randn = lambda: torch.stack([  # noqa: E731
            torch.randn((cond.shape[0], *sample_shape), generator=gen, device=cond.device, dtype=cond.dtype)
            for gen in generators])
        x = randn()
        for k, (t, a, a_prev_sqrt, eps_coef, sigma) in enumerate(self.coefficients):
            output = net(x, t, cond).to(x.dtype)
            x0, eps = to_x0(output, x, a, self.prediction_type)
            if self.clip is not None:
                x0 = x0.clamp(*self.clip)
                eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
            x = a_prev_sqrt * x0 + eps_coef * eps
            if sigma > 0 and k + 1 < len(self.coefficients):
                x = x + sigma * randn()
        return x


def _fast_on_cpu(precision: Precision) -> bool:
    """Whether oneDNN has native kernels for ``precision`` on this CPU (AVX-512 BF16 / AMX for bfloat16)."""
    if precision is Precision.BFLOAT16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if precision is Precision.FLOAT16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return True


def _seed(generator: torch.Generator | None) -> int:
    """One seed drawn from ``generator`` (``None``: from PyTorch's global generator)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(2**62, (1,), generator=generator, device=device))

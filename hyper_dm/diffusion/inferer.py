"""MONAI ``Inferer`` for Hyper-DM: condition images in, M x N DDIM statistics out."""

from __future__ import annotations

import torch
from monai.inferers import Inferer

from ..data.transforms import stable_seed
from ..networks.hypernet import WEIGHT_DRAWS, HyperNetwork
from .sampler import HyperDDIMSampler, SampleResult

__all__ = ["HyperDiffusionInferer"]


class HyperDiffusionInferer(Inferer):
    """Draws ``m_weights`` weight sets from the HyperNetwork and ``n_draws`` DDIM samples per set.

    The M weight sets come from ``seed`` alone (balanced latents, :data:`~hyper_dm.networks.hypernet.WEIGHT_DRAWS`), so
    every batch sees the same ensemble; the diffusion noise comes from ``seed`` and the call's ``batch_index``, so
    batches start from fresh noise. Results depend on these two only, never on what ran before (the evaluator passes the
    batch's index in its run).

    Args:
        sampler: the DDIM sampler (steps, eta, spacing, clipping, chunking).
        m_weights: M, weight sets per input.
        n_draws: N, DDIM draws per weight set.
        seed: seed of the latent draws and the diffusion noise.
        keep_samples: also return the raw samples ``[M, N, B, C, H, W]`` (for CRPS and coverage).
    """

    def __init__(
        self, sampler: HyperDDIMSampler, m_weights: int = 4, n_draws: int = 4, seed: int = 0,
        keep_samples: bool = False,
    ) -> None:
        super().__init__()
        if m_weights < 1 or n_draws < 1:
            raise ValueError(f"M (m_weights) and N (n_draws) must be >= 1, got M={m_weights}, N={n_draws}")
        self.sampler, self.m_weights, self.n_draws = sampler, m_weights, n_draws
        self.seed, self.keep_samples = seed, keep_samples

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: HyperNetwork, channels: int | None = None,
                 batch_index: int = 0) -> SampleResult:
        """``inputs``: conditions ``[B, C_cond, H, W]``; ``network``: the HyperNetwork (its ``target`` runs);
        ``batch_index``: selects the diffusion noise."""
        weights = network(network.sample_z(self.m_weights, torch.Generator().manual_seed(self.seed), WEIGHT_DRAWS))
        noise = torch.Generator().manual_seed(stable_seed(self.seed, "noise", int(batch_index)))
        return self.sampler.sample(
            network.target, weights, inputs, self.n_draws, noise, keep_samples=self.keep_samples, channels=channels
        )

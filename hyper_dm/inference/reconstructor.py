"""The front door: a volume in, its reconstruction with EU/AU/total variance out, at the volume's own grid.

The 2-D model runs slice by slice on its ``img_size`` grid with one fixed set of M weight sets for the whole volume
(drawn once per call, from balanced latents by default), N DDIM draws per weight set; ``slice_batch`` slices go to the
sampler at once, which groups their draws into network calls (``call_batch``) and runs them at its ``precision``.
Conditions are resized to the model grid (area averaging) when their in-plane size differs, and the outputs are
resized back to the requested output size: the mean bicubic, the variances bilinear (which keeps them non-negative).
An MRI case also brings its measured k-space: each draw, upsampled, is moved towards the measured columns as far as
their noise allows (:func:`hyper_dm.physics.mri.data_consistent`) before the mean and maps are taken on the output
grid, so the maps hold what the measurement leaves open.

Example::

    >>> recon = VolumeReconstructor(network, sampler, img_size=64, m_weights=4, n_draws=4)
    >>> out = recon(cond_hu, gain, offset, out_size=(512, 512))      # cond_hu: [1, X, Y, Z] in HU
    >>> out["mean"].shape, out["eu"].shape                              # [1, 512, 512, Z] HU, HU^2
    >>> out = recon.reconstruct_case(case)                              # a loaded case (its k-space, if MRI)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..diffusion.sampler import HyperDDIMSampler
from ..networks.backbone import noise_level
from ..networks.ensemble import DeepEnsemble
from ..networks.hypernet import LATENT_DRAWS, WEIGHT_DRAWS, HyperNetwork
from ..uncertainty import Decomposition, decompose

__all__ = ["OUTPUTS", "VolumeReconstructor", "resize_slices"]

logger = logging.getLogger(__name__)

OUTPUTS = ("mean", "eu", "au", "total")


def resize_slices(images: torch.Tensor, size: tuple[int, int], upsample: str = "bilinear") -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C, *size]``: area averaging down, ``upsample`` (``"bilinear"`` / ``"bicubic"``)
    up, untouched when equal."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrink = images.shape[-2] >= size[0] and images.shape[-1] >= size[1]
    if shrink:
        return F.interpolate(images, size=size, mode="area")
    return F.interpolate(images, size=size, mode=upsample, align_corners=False)


class VolumeReconstructor:
    """M x N Hyper-DM reconstruction of whole volumes, slice by slice (the last axis).

    Args:
        network: the trained HyperNetwork (its ``target`` is the backbone), or a
            :class:`~hyper_dm.networks.DeepEnsemble`; moved to nothing, runs where it is.
        sampler: the DDIM sampler (steps, eta, spacing, clipping, images per network call, precision).
        img_size: the model grid S (slices are resized to S x S); ``None`` runs at the volume's own size.
        m_weights: M, weight sets per volume. ``n_draws``: N, draws per weight set.
        slice_batch: slices per sampler call (the statistics of ``slice_batch`` slices are held at once).
        seed: seed of the weight sets and of the diffusion noise; the same call gives the same result.
        weight_draws: how the M latents are drawn, ``"balanced"`` (:func:`~hyper_dm.networks.balance_latents`) or
            ``"iid"``; a calibration records it.
    """

    def __init__(
        self,
        network: HyperNetwork | DeepEnsemble,
        sampler: HyperDDIMSampler,
        img_size: int | None,
        m_weights: int = 4,
        n_draws: int = 4,
        slice_batch: int = 8,
        seed: int = 0,
        weight_draws: str = WEIGHT_DRAWS,
    ) -> None:
        if weight_draws not in LATENT_DRAWS:
            raise ValueError(f"weight_draws must be one of {LATENT_DRAWS}, got {weight_draws!r}")
        if m_weights < 1 or n_draws < 1 or slice_batch < 1:
            raise ValueError(f"M, N and slice_batch must be >= 1, got M={m_weights}, N={n_draws}, "
                             f"slice_batch={slice_batch}")
        if isinstance(network, DeepEnsemble):
            network.check_weight_sets(m_weights)  # at construction, not at the first case
        if m_weights == 1:
            logger.warning("M=1: with a single weight set EU cannot be estimated; the EU map is zero")
        if n_draws == 1:
            logger.warning("N=1: with a single draw per weight set AU cannot be estimated; the AU map is zero and "
                           "EU holds the whole spread")
        self.network, self.sampler = network, sampler
        self.img_size, self.m_weights, self.n_draws = img_size, m_weights, n_draws
        self.slice_batch, self.seed, self.weight_draws = slice_batch, seed, weight_draws

    def with_seed(self, seed: int) -> VolumeReconstructor:
        """This reconstructor drawing other weight sets and other diffusion noise (``seed``); nothing is copied
        but the settings."""
        other = copy.copy(self)
        other.seed = seed
        return other

    def _model_input(self, cond: torch.Tensor, gain: torch.Tensor, offset: torch.Tensor, index: slice) -> tuple:
        """Slices ``index`` of ``cond [1, x, y, Z]`` in the model's range on its grid ``[b, 1, S, S]`` (CPU), and
        the per-slice ``gain``/``offset`` as ``[b, 1, 1, 1]``."""
        g = gain[index].view(-1, 1, 1, 1).float()
        o = offset[index].view(-1, 1, 1, 1).float()
        x = (cond[0, ..., index].permute(2, 0, 1)[:, None].float() - o) / g
        return resize_slices(x, (self.img_size, self.img_size) if self.img_size else tuple(cond.shape[1:3])), g, o

    @torch.inference_mode()
    def noise_levels(self, cond: torch.Tensor, gain: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The measurement noise the network reads from each slice of ``cond [1, x, y, Z]``: ``[Z]``, model units
        (:func:`hyper_dm.networks.noise_level` of the slice as the network gets it); what calibration bins on."""
        z = cond.shape[-1]
        return torch.cat([noise_level(self._model_input(cond, gain, offset, slice(i, i + self.slice_batch))[0])[:, 0]
                          for i in range(0, z, self.slice_batch)])

    @torch.inference_mode()
    def __call__(
        self,
        cond: torch.Tensor,
        gain: torch.Tensor,
        offset: torch.Tensor,
        out_size: tuple[int, int] | None = None,
        on_slices: Callable[[int, int], None] | None = None,
        kspace: tuple | None = None,
    ) -> dict[str, torch.Tensor]:
        """Reconstruct ``cond [1, x, y, Z]`` (physical units: HU / magnitude).

        ``gain``/``offset`` ``[Z]``: physical = gain * model + offset per slice (variances scale by gain^2).
        Returns ``mean``, ``eu``, ``au``, ``total``: float32 ``[1, *out_size, Z]`` on the CPU (default
        ``out_size``: the in-plane size of ``cond``). ``on_slices(done, total)`` reports progress.
        ``kspace``: ``(kspace [Z, H, W] complex, mask [W] bool)`` of an MRI case on the ``[320, 320]`` output grid:
        every draw is moved towards it before the statistics are taken.
        """
        if cond.ndim != 4 or cond.shape[0] != 1:
            raise ValueError(f"cond must be [1, X, Y, Z], got shape {tuple(cond.shape)}")
        z = cond.shape[-1]
        if gain.shape != (z,) or offset.shape != (z,):
            raise ValueError(f"gain and offset must be [Z={z}], got {tuple(gain.shape)} and {tuple(offset.shape)}")
        out_size = tuple(out_size or cond.shape[1:3])
        device = next(self.network.parameters()).device
        generator = torch.Generator().manual_seed(self.seed)
        self.network.eval()
        weights = self.network(self.network.sample_z(self.m_weights, generator, self.weight_draws))  # once per volume
        outputs = {name: torch.empty(1, *out_size, z) for name in OUTPUTS}
        for start in range(0, z, self.slice_batch):
            index = slice(start, min(start + self.slice_batch, z))
            x, g, o = self._model_input(cond, gain, offset, index)
            x = x.to(device)
            result = self.sampler.sample(self.network.target, weights, x, self.n_draws, generator,
                                         keep_samples=kspace is not None)
            if kspace is None:
                stats = self._upsampled(result.stats, out_size, g, o)
            else:
                stats = self._consistent(result.samples, out_size, g, o, kspace[0][index], kspace[1])
            for name in ("mean", "eu", "au"):
                outputs[name][0, ..., index] = getattr(stats, name)[:, 0].permute(1, 2, 0)
            if on_slices is not None:
                on_slices(index.stop, z)
        outputs["total"] = outputs["eu"] + outputs["au"]  # exact after resizing too (bilinear is linear)
        return outputs

    def reconstruct_case(self, case: dict, on_slices: Callable[[int, int], None] | None = None) -> dict:
        """:meth:`__call__` on a loaded case (:func:`~hyper_dm.inference.loading.load_case`): its ``cond``,
        ``gain``, ``offset`` and, for MRI, ``kspace``/``kspace_mask``, on the grid of its ``volume``."""
        kspace = (case["kspace"], case["kspace_mask"]) if case.get("kspace") is not None else None
        return self(case["cond"], case["gain"], case["offset"], out_size=tuple(case["volume"].shape[1:3]),
                    on_slices=on_slices, kspace=kspace)

    def _upsampled(self, stats: Decomposition, size: tuple[int, int], gain: torch.Tensor,
                   offset: torch.Tensor) -> Decomposition:
        """Model-grid statistics ``[b, 1, S, S]`` on the ``size`` grid in physical units: the mean as
        :meth:`_upsampled_images`, the variances bilinear (never negative)."""
        return Decomposition(mean=self._upsampled_images(stats.mean, size) * gain + offset,
                             eu=resize_slices(stats.eu.float().cpu(), size) * gain**2,
                             au=resize_slices(stats.au.float().cpu(), size) * gain**2)

    def _upsampled_images(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``[B, 1, S, S]`` model-unit images on the ``size`` grid, bicubic and clamped to the sampler's range
        (bicubic overshoots at edges)."""
        images = resize_slices(images.float().cpu(), size, "bicubic")
        return images.clamp(*self.sampler.clip) if self.sampler.clip is not None else images

    def _consistent(self, samples: torch.Tensor, size: tuple[int, int], gain: torch.Tensor, offset: torch.Tensor,
                    kspace: np.ndarray, mask: np.ndarray) -> Decomposition:
        """Statistics of the draws ``samples [M, N, b, 1, S, S]`` after each is upsampled (:meth:`_upsampled_images`)
        to ``size``, put in physical units and moved towards its slice's measured ``kspace [b, H, W]`` on the
        columns ``mask [W]``: the maps then hold what the measurement leaves open."""
        from ..physics.mri import data_consistent  # the optional [mri] extra

        m, n, b = samples.shape[:3]
        draws = self._upsampled_images(samples.flatten(0, 2), size).view(m * n, b, *size)
        draws = (draws * gain.view(1, b, 1, 1) + offset.view(1, b, 1, 1)).transpose(0, 1)  # [b, M N, X, Y]
        draws = torch.from_numpy(data_consistent(draws.contiguous().numpy(), kspace, mask))
        return decompose(draws.transpose(0, 1).reshape(m, n, b, 1, *size))

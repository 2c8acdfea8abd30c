"""Probe inputs for the KL term of mode ``eu`` (:func:`~hyper_dm.diffusion.training_loss`'s ``probe_cond``,
``probe_mask`` and ``probe_columns``): conditions off the training distribution, where the MSE does not hold the
weight sets together, and the k-space columns a single-coil measurement fixes.

Both draw from ``generator`` (on its device), or from torch's global random state when it is ``None`` (the bundle's
trainer, whose checkpoints carry that state).
"""

from __future__ import annotations

import torch

from ..data.config import FASTMRI_CENTER_FRACTIONS
from ..data.fastmri_knee import RECON_SHAPE
from ..networks.backbone import noise_level

__all__ = ["PROBES", "random_columns", "random_objects"]

PROBES = ("none", "objects", "objects_inside")  # training_cfg#probes: no probe, the whole probe, inside its objects


def random_objects(cond: torch.Tensor, generator: torch.Generator | None = None, noisy: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``cond [B, 1, H, W]`` with three random ellipses of random value and stripe texture pasted in, and where
    they lie (bool ``[B, 1, H, W]``, the ``probe_mask`` of a term that acts inside the objects only). ``noisy``: the
    objects carry Gaussian noise of each slice's own level (:func:`~hyper_dm.networks.noise_level`), so that a
    probe departs from its input in content only, not in how noisy it is."""
    b, _, h, w = cond.shape
    draw_on = generator.device if generator is not None else cond.device
    sigma = noise_level(cond).view(b, 1, 1) if noisy else None
    out, pasted = cond.clone(), torch.zeros_like(cond, dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(h, device=cond.device), torch.arange(w, device=cond.device),
                            indexing="ij")
    for _ in range(3):
        r = torch.rand(b, 7, generator=generator, device=draw_on).to(cond.device)
        cy, cx, ay, ax = r[:, 0] * h, r[:, 1] * w, 2 + r[:, 2] * h / 6, 2 + r[:, 3] * w / 6
        inside = ((yy - cy.view(b, 1, 1)) / ay.view(b, 1, 1)) ** 2 + ((xx - cx.view(b, 1, 1)) / ax.view(b, 1, 1)) ** 2
        period = 2 + (r[:, 4] * 4).floor().view(b, 1, 1)
        value = (2 * r[:, 5] - 1).view(b, 1, 1) * (1 - ((xx // period) % 2) * r[:, 6].view(b, 1, 1))
        if noisy:
            value = value + sigma * torch.randn(b, h, w, generator=generator, device=draw_on).to(cond.device)
        out[:, 0] = torch.where(inside <= 1, value, out[:, 0])
        pasted[:, 0] |= inside <= 1
    return out, pasted


def random_columns(b: int, width: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The k-space columns (bool ``[B, width]`` on the CPU, centred: column ``width // 2`` is DC) that fastMRI's
    random masks at 4x and 8x (``FASTMRI_CENTER_FRACTIONS``; one drawn per slice) measure, as seen on a
    ``width``-pixel model grid.
    The grid's DFT has the 320-pixel image's frequency spacing, so it sees the central ``width`` of those
    frequencies: fully sampled, the columns within ``round(fraction * 320) / 2`` of DC (27 at 4x, 13 at 8x; fastMRI's
    centre block of ``round(fraction * 368)`` columns of the 368-wide k-space spans about 25 and 13 of them), and
    outside them each column measured with the probability ``(1 / acceleration - fraction) / (1 - fraction)`` that
    keeps a random mask's acceleration. An approximation: the data consistency works on the 368 columns."""
    draw_on = generator.device if generator is not None else None
    pick = torch.randint(0, len(FASTMRI_CENTER_FRACTIONS), (b,), generator=generator, device=draw_on).cpu()
    acceleration = torch.tensor(list(FASTMRI_CENTER_FRACTIONS), dtype=torch.float32)[pick]
    fraction = torch.tensor(list(FASTMRI_CENTER_FRACTIONS.values()), dtype=torch.float32)[pick]
    distance = (torch.arange(width) - width // 2).abs()
    band = distance[None] <= (fraction * RECON_SHAPE[1]).round()[:, None] / 2
    chance = ((1 / acceleration - fraction) / (1 - fraction))[:, None]
    return band | (torch.rand(b, width, generator=generator, device=draw_on).cpu() < chance)

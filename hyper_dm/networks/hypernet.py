"""HyperNetwork ``H(z) -> theta``: weight sets for a frozen target module.

Parameterisation (per parameter tensor ``W_l`` of the target, viewed as a matrix
``[rows_l, cols_l]`` with ``rows_l = shape[0]`` and ``cols_l = numel / rows_l``)::

    W_l(z) = W0_l + D_l + U_l diag(c_l(z)) V_l^T

- ``W0_l``: the target's own parameters, a frozen template (``requires_grad=False``).
- ``D_l``: a learned offset shared by every ``z`` (the HyperNetwork's "mean" weights).
- ``U_l [rows_l, r_l]``, ``V_l [cols_l, r_l]``: learned bases of a rank ``r_l = min(rank, rows_l, cols_l)``
  subspace; ``c_l(z) [r_l]``: coefficients produced by a small MLP trunk from ``z ~ N(0, I)``.

Only the low-rank term depends on ``z``, so the spread of generated weights (the source of
epistemic uncertainty) lives in a subspace of ``R = sum_l r_l`` dimensions, while ``D_l`` lets the
mean weights move anywhere. A full-weight output layer would cost ``hidden * P`` parameters; this one
costs::

    n_params = P                                   # D
             + sum_l r_l * (rows_l + cols_l)        # U, V
             + z_dim*hidden + hidden + hidden**2 + hidden   # trunk (2 layers)
             + hidden*R + R                         # coefficient head

where ``P`` is the target's parameter count (``HyperNetwork.count_parameters`` reports the split).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LATENT_DRAWS", "WEIGHT_DRAWS", "HyperNetwork", "balance_latents"]

LATENT_DRAWS = ("iid", "balanced")
"""The ways :meth:`HyperNetwork.sample_z` draws latents."""
WEIGHT_DRAWS = "balanced"
"""How inference (and validation during training) draws the latents of its M weight sets; a calibration records it,
as the EU threshold it fits holds for weight sets drawn the same way. The training loss draws them iid."""


class HyperNetwork(nn.Module):
    """Generates M weight sets for ``target`` from M latent draws.

    Args:
        target: the module whose parameters are generated; its parameters are frozen in place and
            kept as the template ``W0`` (they are part of this module's ``state_dict``).
        z_dim: size of the latent ``z``.
        hidden: width of the MLP trunk.
        rank: maximum rank ``r`` of the z-dependent offset per parameter tensor.
        offset_scale: initial size of the z-dependent offset relative to the template tensor's RMS
            (``1/sqrt(cols)`` for an all-zero template): how different the weight sets are before training.

    Example:
        >>> mlp = nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Linear(16, 1))
        >>> hyper = HyperNetwork(mlp, z_dim=4, hidden=32, rank=2)
        >>> z = hyper.sample_z(3, generator=torch.Generator().manual_seed(0))
        >>> weights = hyper(z)           # dict name -> [3, *shape]
        >>> weights["0.weight"].shape
        torch.Size([3, 16, 2])
    """

    def __init__(
        self, target: nn.Module, z_dim: int = 8, hidden: int = 64, rank: int = 4, offset_scale: float = 0.5
    ) -> None:
        super().__init__()
        if z_dim < 1 or hidden < 1 or rank < 1:
            raise ValueError(f"z_dim, hidden and rank must be >= 1, got {z_dim}, {hidden}, {rank}")
        self.z_dim = z_dim
        self.target = target
        for p in target.parameters():
            p.requires_grad_(False)
        self.names = [name for name, _ in target.named_parameters()]
        self.shapes = [p.shape for _, p in target.named_parameters()]
        if not self.names:
            raise ValueError(f"target {type(target).__name__} has no parameters to generate")
        self.base = nn.ParameterList([nn.Parameter(torch.zeros_like(p)) for p in target.parameters()])
        self.ranks: list[int] = []
        self.left = nn.ParameterList()
        self.right = nn.ParameterList()
        for shape, template in zip(self.shapes, target.parameters(), strict=True):
            rows = shape[0] if len(shape) else 1
            cols = math.prod(shape) // rows
            r = min(rank, rows, cols)
            self.ranks.append(r)
            self.left.append(nn.Parameter(torch.randn(rows, r)))
            self.right.append(nn.Parameter(torch.randn(cols, r) * offset_scale * _scale(template, cols) / math.sqrt(r)))
        self.trunk = nn.Sequential(nn.Linear(z_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.head = nn.Linear(hidden, sum(self.ranks))

    def sample_z(self, m: int, generator: torch.Generator | None = None, draws: str = "iid",
                 groups: int = 1) -> torch.Tensor:
        """``m`` latents ``[m, z_dim]`` on this module's device: ``draws="iid"``, ``z ~ N(0, I)``; ``"balanced"``:
        those draws centred and whitened (:func:`balance_latents`), each of ``groups`` interleaved row groups (row
        ``i`` in group ``i mod groups``) apart, as inference draws them (:data:`WEIGHT_DRAWS`). The draws are
        made and balanced where ``generator`` lives, so a CPU generator gives the same latents for any device."""
        if draws not in LATENT_DRAWS:
            raise ValueError(f"draws must be one of {LATENT_DRAWS}, got {draws!r}")
        device = self.head.weight.device
        z = torch.randn(m, self.z_dim, generator=generator, device=generator.device if generator else device)
        for g in range(groups if draws == "balanced" else 0):
            z[g::groups] = balance_latents(z[g::groups])
        return z.to(device)

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weight sets for latents ``z [M, z_dim]``: a dict ``name -> [M, *shape]`` for ``functional_call``."""
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must have shape [M, {self.z_dim}], got {tuple(z.shape)}")
        coeffs = self.head(self.trunk(z)).split(self.ranks, dim=1)  # each [M, r_l]
        template = dict(self.target.named_parameters())
        weights = {}
        for name, shape, base, left, right, c in zip(
            self.names, self.shapes, self.base, self.left, self.right, coeffs, strict=True
        ):
            offset = torch.einsum("ir,mr,jr->mij", left, c, right).reshape(z.shape[0], *shape)
            weights[name] = template[name] + base + offset
        return weights

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer updates (everything but the frozen template)."""
        return [p for p in self.parameters() if p.requires_grad]

    def count_parameters(self) -> dict[str, int]:
        """Parameter counts: the frozen ``target`` template and the trainable HyperNetwork parts."""
        count = lambda params: sum(p.numel() for p in params)  # noqa: E731
        return {
            "target": count(self.target.parameters()),
            "base": count(self.base),
            "subspace": count(self.left) + count(self.right),
            "mlp": count(self.trunk.parameters()) + count(self.head.parameters()),
            "trainable": count(p for p in self.parameters() if p.requires_grad),
        }


def balance_latents(z: torch.Tensor) -> torch.Tensor:
    """The draws ``z [m, D]`` centred and whitened: sample mean 0 and sample covariance ``I`` (``1 / (m - 1)``
    normalised) where ``m > D``; with fewer draws, the ``m - 1`` directions they span (random, as the draws') each
    get variance ``D / (m - 1)``, so the covariance keeps its expected trace ``D``. One draw is returned as drawn.

    EU is a variance across weight sets. From iid draws it inherits the draws' own chance spread along each
    latent direction (chi-square with ``m - 1`` degrees of freedom); balanced draws give every direction its
    expected spread, so for a HyperNetwork linear in ``z`` EU is exact where ``m > D`` and unbiased below. Measured
    on the shipped CT model (docs/recipes.md, "Balanced weight sets"): EU's level varies 5.6x between seeds at
    ``M = 4`` against 11x with iid draws.
    """
    m, d = z.shape
    if m < 2:
        return z
    u, _, vh = torch.linalg.svd(z - z.mean(0, keepdim=True), full_matrices=False)
    k = min(m - 1, d)  # the centred draws have rank m - 1 at most
    return (u[:, :k] * math.sqrt(d * (m - 1) / k)) @ vh[:k]


def _scale(template: torch.Tensor, cols: int) -> float:
    """Typical entry size of a template tensor: its RMS, or ``1/sqrt(cols)`` when it is all zeros."""
    rms = template.detach().float().pow(2).mean().sqrt().item()
    return rms if rms > 0 else 1.0 / math.sqrt(cols)

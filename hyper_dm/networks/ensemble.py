"""The deep-ensemble baseline: K independently trained models behind the HyperNetwork's interface.

A deep ensemble (Lakshminarayanan et al., 2017; the baseline of the Hyper-DM paper) is K models of the same
architecture trained apart, from other seeds; its EU is the spread across members. :class:`DeepEnsemble` holds K
trained :class:`~hyper_dm.networks.HyperNetwork` s and hands out weight sets as one of them does, so the sampler,
inference, calibration and evaluation run an ensemble unchanged: weight set ``i`` of ``M`` comes from member
``i mod K``, from that member's own latent draw. With ``M = K`` each member gives one weight set, as the paper's
ensemble; ``M`` must be a multiple of ``K`` so that every member weighs the same.

Example::

    >>> ensemble = DeepEnsemble([member_0, member_1, member_2])      # trained HyperNetworks, same architecture
    >>> weights = ensemble(ensemble.sample_z(3, generator))         # name -> [3, *shape], one set per member
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from .hypernet import HyperNetwork

__all__ = ["DeepEnsemble", "hyper_network"]


class DeepEnsemble(nn.Module):
    """K trained HyperNetworks (``members``) as one weight-set generator; ``target`` is the first member's backbone
    (every member's weight sets give all of its parameters, so any member's backbone runs them)."""

    def __init__(self, members: Sequence[HyperNetwork]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"a deep ensemble needs at least 2 members, got {len(members)}")
        shapes = [(m.names, m.shapes, m.z_dim) for m in members]
        if any(s != shapes[0] for s in shapes[1:]):
            raise ValueError("the members of a deep ensemble must share one architecture (parameter names, shapes "
                             "and z_dim)")
        self.members = nn.ModuleList(members)

    @property
    def target(self) -> nn.Module:
        return self.members[0].target

    def sample_z(self, m: int, generator: torch.Generator | None = None, draws: str = "iid") -> torch.Tensor:
        """``m`` latent draws ``[m, z_dim]`` (row ``i`` feeds member ``i mod K``; ``draws``: as the HyperNetwork's,
        balanced per member: with ``M = K`` each member's one latent is an iid draw)."""
        return self.members[0].sample_z(m, generator, draws, groups=len(self.members))

    def check_weight_sets(self, m: int) -> None:
        """Raise ``ValueError`` unless ``m`` weight sets give every member the same number."""
        k = len(self.members)
        if m % k:
            raise ValueError(f"M={m}: a deep ensemble of {k} members needs M a multiple of {k} (each member gives "
                             f"M / {k} weight sets; inference_cfg#M, --M)")

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weight sets ``name -> [M, *shape]`` for ``z [M, z_dim]``: set ``i`` from member ``i mod K``."""
        self.check_weight_sets(z.shape[0])
        k = len(self.members)
        sets = [member(z[i::k]) for i, member in enumerate(self.members)]  # member i: rows i, i + K, ...
        return {name: torch.stack([s[name] for s in sets], 1).flatten(0, 1) for name in sets[0]}


def hyper_network(target: nn.Module, z_dim: int = 8, hidden: int = 64, rank: int = 4, offset_scale: float = 0.5,
                  ensemble_members: int = 1) -> HyperNetwork | DeepEnsemble:
    """The bundle's ``network_def``: one :class:`HyperNetwork` over ``target``, or with ``ensemble_members`` K > 1 a
    :class:`DeepEnsemble` of K of them over copies of ``target`` (to load an ensemble checkpoint into)."""
    if ensemble_members < 1:
        raise ValueError(f"model#ensemble_members must be >= 1, got {ensemble_members}")
    build = lambda backbone: HyperNetwork(backbone, z_dim, hidden, rank, offset_scale)  # noqa: E731
    if ensemble_members == 1:
        return build(target)
    return DeepEnsemble([build(target if i == 0 else copy.deepcopy(target)) for i in range(ensemble_members)])

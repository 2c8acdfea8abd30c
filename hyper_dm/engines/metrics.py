"""Ignite metric averaging a per-slice quantity of the evaluator output (mean EU, mean AU, CRPS)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

__all__ = ["SliceMean"]


class SliceMean(Metric):
    """Mean over all evaluated slices of the spatial mean of ``output[key]``.

    Reads MONAI's decollated outputs: a list of per-slice dicts, where a per-slice scalar may be a float.

    Args:
        key: output entry, e.g. ``"eu"``, ``"au"`` (variances, squared model units) or ``"crps"``.
    """

    required_output_keys = None  # the whole (decollated) output is passed to update()

    def __init__(self, key: str, output_transform: Callable = lambda x: x, device: str | torch.device = "cpu"):
        self.key = key
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._count = 0

    @reinit__is_reduced
    def update(self, output: list[dict]) -> None:
        values = torch.stack([torch.as_tensor(item[self.key], dtype=torch.float64).mean() for item in output])
        self._sum += values.sum().to(self._device)
        self._count += values.numel()

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        if self._count == 0:
            raise NotComputableError(f"SliceMean({self.key!r}) needs at least one evaluated slice")
        return self._sum.item() / self._count

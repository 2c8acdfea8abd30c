"""Ignite metrics over the evaluator output: per-slice means (EU, AU, CRPS) and calibration (coverage, UCE, AUSE)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from ..uncertainty import ause, gaussian_coverage, uce
from .distributed import gather

__all__ = ["CalibrationScore", "SliceMean"]

_MAX_PIXELS_PER_SLICE = 1024  # calibration scores keep a fixed-stride subsample of each slice


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


class CalibrationScore(Metric):
    """How well the predicted total variance describes the error over the evaluated slices.

    ``score``: ``"coverage_90"`` (fraction of pixels inside the central 90% interval of ``N(pred, total)``; the
    ideal is 0.9), ``"uce"`` (squared model units; 0 ideal) or ``"ause"`` (0 ideal, a random ordering about 0.5).
    Reads decollated per-slice dicts with ``pred``, ``total`` and ``label``; keeps up to 1024 pixels per slice.
    Under ``torch.distributed`` the score is computed on the kept pixels of all ranks.
    """

    required_output_keys = None
    SCORES = ("coverage_90", "uce", "ause")

    def __init__(self, score: str, output_transform: Callable = lambda x: x, device: str | torch.device = "cpu"):
        if score not in self.SCORES:
            raise ValueError(f"score must be one of {self.SCORES}, got {score!r}")
        self.score = score
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._parts: list[torch.Tensor] = []  # [3, n]: pred, total, label

    @reinit__is_reduced
    def update(self, output: list[dict]) -> None:
        for item in output:
            stack = torch.stack([torch.as_tensor(item[k]).detach().flatten().double().cpu()
                                 for k in ("pred", "total", "label")])
            self._parts.append(stack[:, :: max(1, stack.shape[1] // _MAX_PIXELS_PER_SLICE)])

    def compute(self) -> float:
        parts = torch.cat(self._parts, dim=1) if self._parts else torch.zeros(3, 0, dtype=torch.float64)  # [3, n]
        pred, total, label = torch.cat(gather(parts), dim=1)
        if not pred.numel():
            raise NotComputableError(f"CalibrationScore({self.score!r}) needs at least one evaluated slice")
        if self.score == "coverage_90":
            return gaussian_coverage(pred, total, label, [0.9])[0.9]
        if self.score == "uce":
            return uce(total, (pred - label) ** 2)
        return ause(total, (pred - label).abs())

"""Output transforms that turn evaluator outputs into per-slice values for Ignite metrics."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["item_means"]


def item_means(key: str) -> Callable[[list | dict], torch.Tensor]:
    """Output transform: the mean of ``key`` for each slice, ``[B]`` (e.g. for ``ignite.metrics.Average``).

    Works on MONAI's decollated outputs (a list of per-slice dicts) and on batched dicts.

    Example:
        >>> item_means("eu")([{"eu": torch.ones(1, 2, 2)}, {"eu": torch.zeros(1, 2, 2)}])
        tensor([1., 0.])
    """

    def transform(output: list | dict) -> torch.Tensor:
        if isinstance(output, dict):
            return output[key].flatten(1).float().mean(dim=1) if output[key].ndim > 1 else output[key].float()
        return torch.stack([item[key].float().mean() for item in output])

    return transform

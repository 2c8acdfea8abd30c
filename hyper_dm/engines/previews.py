"""PNG preview of one reconstructed slice: cond | mean | EU | AU | |error| | target, in physical units."""

from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["write_preview"]


def write_preview(
    path: str | os.PathLike,
    mean: np.ndarray,
    eu: np.ndarray,
    au: np.ndarray,
    cond: np.ndarray | None = None,
    target: np.ndarray | None = None,
    title: str = "",
) -> None:
    """Save a one-row PNG of ``[S, S]`` maps (voxel axis 0 to the right, axis 1 up) with colour bars.

    ``cond``, ``mean`` and ``target`` share one grey window (the ``mean``'s 1st-99th percentile, in physical
    units); ``EU`` and ``AU`` (variances, squared units) and ``|mean - target|`` get their own scales.
    Uses matplotlib's Agg canvas directly (no pyplot state), so it is safe in worker threads.
    """
    lo, hi = np.percentile(mean, [1, 99])
    hi = hi if hi > lo else lo + 1.0
    tiles: list[tuple[str, np.ndarray, dict]] = []
    grey = {"cmap": "gray", "vmin": lo, "vmax": hi}
    if cond is not None:
        tiles.append(("cond", cond, grey))
    tiles += [("mean", mean, grey), ("EU (var)", eu, {"cmap": "magma"}), ("AU (var)", au, {"cmap": "magma"})]
    if target is not None:
        tiles += [("|error|", np.abs(mean - target), {"cmap": "inferno"}), ("target", target, grey)]
    fig = Figure(figsize=(3.0 * len(tiles), 3.2))  # fixed layout: constrained layout costs seconds per figure
    FigureCanvasAgg(fig)
    for ax, (name, image, style) in zip(fig.subplots(1, len(tiles), squeeze=False)[0], tiles, strict=True):
        shown = ax.imshow(np.asarray(image, dtype=np.float32).T, origin="lower", interpolation="nearest", **style)
        ax.set_title(name)
        ax.set_axis_off()
        fig.colorbar(shown, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.01, right=0.97, bottom=0.02, top=0.82, wspace=0.25)
    fig.savefig(path, format="png", dpi=100)

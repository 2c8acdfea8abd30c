"""Bad-input policy: errors that name the file and the fault, and the ``on_bad_file`` choice between them.

``on_bad_file="raise"`` stops at the first bad file with :class:`BadInputError`; ``"skip"`` logs a warning per
bad file, leaves it out of the datalist and counts it in :class:`BadFileLog`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = ["BadFileLog", "BadInputError", "OnBadFile", "check_finite"]

logger = logging.getLogger(__name__)

OnBadFile = Literal["raise", "skip"]


class BadInputError(ValueError):
    """A dataset file (or folder) that cannot be used; the message names the path, the fault and a fix."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass
class BadFileLog:
    """Applies ``on_bad_file`` and records what was skipped (``skipped``: ``(path, problem)`` pairs)."""

    on_bad_file: OnBadFile = "raise"
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.on_bad_file not in ("raise", "skip"):
            raise ValueError(f"on_bad_file must be 'raise' or 'skip', got {self.on_bad_file!r}")

    def handle(self, error: BadInputError) -> None:
        """Raise ``error`` (``"raise"``) or log and count it (``"skip"``)."""
        if self.on_bad_file == "raise":
            raise error
        self.skipped.append((error.path, error.problem))
        logger.warning("skipping bad file %s (%d skipped so far)", error, len(self.skipped))


def check_finite(array: np.ndarray, path: str | Path, what: str) -> None:
    """Raise :class:`BadInputError` naming ``path`` and ``what`` if ``array`` holds NaN or infinite values."""
    bad = ~np.isfinite(array)
    if bad.any():
        raise BadInputError(path, f"{what} contains {int(bad.sum())} NaN/infinite values; fix or remove the file")


def check_kspace(kspace: np.ndarray, path: str | Path, what: str) -> None:
    """:func:`check_finite`, and reject values so large that the orthonormal inverse FFT of ``kspace [..., H, W]``
    would overflow float32 (its output is bounded by ``max |k| * sqrt(H W)``)."""
    check_finite(kspace, path, what)
    peak = float(np.abs(kspace).max(initial=0.0))
    limit = float(np.finfo(np.float32).max) / np.sqrt(kspace.shape[-1] * kspace.shape[-2]) / 16
    if peak > limit:
        raise BadInputError(path, f"{what} has values up to {peak:.3g}, which overflow the inverse FFT in float32 "
                                  f"(limit {limit:.3g}; fastMRI single-coil k-space peaks near 1e-3): check how the "
                                  "file was scaled")

"""MONAI ``CheckpointSaver`` whose files are written atomically (a kill never leaves a truncated checkpoint).

MONAI 1.6.1 saves with Ignite's ``DiskSaver(atomic=False)`` (to keep group/other read permission), so a run
killed while saving leaves a partial ``.pt`` that a resume cannot load. Here every file is written to a
temporary name in the same folder and renamed into place (Ignite's ``atomic=True`` path, which also adds
group/other read permission).
"""

from __future__ import annotations

from collections.abc import Mapping

from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

__all__ = ["AtomicCheckpointSaver"]


class _AtomicDiskSaver(DiskSaver):
    """Ignite ``DiskSaver(atomic=True)`` with an optional fixed file name (as MONAI's own saver has)."""

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def remove(self, filename: str) -> None:
        super().remove(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` (same arguments) with atomic writes of every checkpoint it saves."""

    def __init__(self, save_dir: str, save_dict: dict, **kwargs) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, checkpoint.save_handler.filename)

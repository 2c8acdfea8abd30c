"""The model behind the app's infer tasks and its scoring: one loaded :class:`~hyper_dm.inference.HyperDM`, one
reconstruction at a time, the last result kept.

- One at a time, across processes: a reconstruction holds a file lock (:func:`lock_path`, one per studies folder),
  so MONAI Label's background scoring process, a second ``--workers`` process or a batch run never compute beside
  a request and double the memory. A request that finds it taken is refused at once (HTTP 429 with
  ``Retry-After``); scoring waits for it.
- The last result is kept: ``hyperdm_mean``, ``hyperdm_eu`` and ``hyperdm_au`` of the same study and parameters
  cost one reconstruction (the maps come from one M x N run; seeds are fixed, so a recomputation gives the same).

Example::

    >>> service = ReconstructionService(LabelConf.parse({"ckpt": "model.pt"}), lock_file="/tmp/x.lock")
    >>> out, cached = service.reconstruct("study.nii.gz", Sampling(M=4, N=4, steps=10))
    >>> out["eu"].shape                               # [1, X, Y, Z] MetaTensor, HU^2, the study's geometry
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from ...data.validation import BadInputError
from ...inference import OUTPUTS, HyperDM
from .conf import LabelConf, RequestError, Sampling

__all__ = ["CALIBRATED", "MODEL_NAMES", "UNFAMILIAR", "RETRY_AFTER_S", "ReconstructionService", "lock_path"]

logger = logging.getLogger("hyper_dm.monailabel")

RETRY_AFTER_S = 30
"""Seconds a refused request is told to wait (the ``Retry-After`` header)."""
CALIBRATED = "total_std_calibrated"
"""The calibrated map, served where the model has a calibration."""
UNFAMILIAR = "unfamiliar"
"""The mask of pixels whose EU, or its local contrast, exceeds the calibration's threshold, served where the
calibration records one."""
MODEL_NAMES = {name: f"hyperdm_{name}" for name in (*OUTPUTS, CALIBRATED, UNFAMILIAR)}
"""MONAI Label model name of each output map."""


def lock_path(studies: str | os.PathLike) -> Path:
    """The lock file shared by every process serving ``studies`` (in the system's temporary folder)."""
    key = hashlib.sha1(os.path.realpath(str(studies)).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"hyper_dm_monailabel_{key}.lock"


class ReconstructionService:
    """Loads the model once (``conf.ckpt`` into the bundle network of ``conf.config`` on ``conf.device``) and runs
    :meth:`HyperDM.reconstruct` for the app, one call at a time across the processes sharing ``lock_file``."""

    def __init__(self, conf: LabelConf, lock_file: str | os.PathLike) -> None:
        self.conf = conf
        device = conf.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = HyperDM.from_bundle(conf.ckpt, conf.config, device=device, calibration=conf.calibration)
        self.task = str(self.model.data["task"])
        self.default_steps = int(self.model.parser.get_parsed_content("diffusion#ddim_steps"))
        calibration = self.model.calibration
        served = {CALIBRATED: calibration is not None,  # unfamiliar: whichever acceleration a study's mask takes
                  UNFAMILIAR: calibration is not None and all(c.eu_threshold is not None for c in calibration.groups)}
        self.model_names = {output: name for output, name in MODEL_NAMES.items() if served.get(output, True)}
        """The maps this model serves: MONAI Label model name of each."""
        self.lock = FileLock(str(lock_file))
        self._last: tuple[tuple, dict[str, Any]] | None = None

    def reconstruct(self, path: str, sampling: Sampling, wait: bool = False, name: str | None = None
                    ) -> tuple[dict[str, Any], bool]:
        """:meth:`HyperDM.reconstruct` of the study at ``path`` (its maps ``[1, X, Y, Z]`` and ``input_check``) and
        whether it came from the kept last result. ``wait``: wait for a running reconstruction instead of refusing
        (429). ``name`` is how errors call the study (default: the file name).

        Raises :class:`RequestError`: 429 while another reconstruction runs, 422 for a file that is not a volume
        this model reconstructs.
        """
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size, sampling)
        if self._last is not None and self._last[0] == key:
            return self._last[1], True
        try:
            self.lock.acquire(timeout=-1 if wait else 0)
        except Timeout:
            raise RequestError(429, "another reconstruction is running on this server (a request or the "
                                    f"background scoring); retry in {RETRY_AFTER_S} s",
                               {"Retry-After": str(RETRY_AFTER_S)}) from None
        try:
            out = self.model.reconstruct(path, M=sampling.M, N=sampling.N, steps=sampling.steps,
                                         mode=self.conf.input_mode)
        except BadInputError as e:
            problem = e.problem.splitlines()[0]  # MONAI's reader errors go on about installing readers
            raise RequestError(422, f"{name or Path(path).name}: {problem}; expected a 3-D "
                                    f"{'CT volume (NIfTI)' if self.task == 'ct' else 'fastMRI .h5 file'}") from e
        finally:
            self.lock.release()
        self._last = (key, out)
        return out, False

"""Write one reconstructed case whole, or not at all.

Layout (MONAI's ``SaveImage`` convention, one folder per case; ``{stem}`` checked by :func:`hyper_dm.io.safe_stem`)::

    {output_dir}/{stem}/{stem}_mean.nii.gz    posterior mean, physical units (CT: HU), the source's grid and geometry
    {output_dir}/{stem}/{stem}_eu.nii.gz      epistemic variance (units^2)
    {output_dir}/{stem}/{stem}_au.nii.gz      aleatoric variance (units^2)
    {output_dir}/{stem}/{stem}_total.nii.gz   eu + au
    {output_dir}/{stem}/{stem}_{eu,au,total}_std.nii.gz   square roots (write_std=True)
    {output_dir}/{stem}/{stem}_total_std_calibrated.nii.gz  calibrated total std (when a calibration is given)
    {output_dir}/{stem}/{stem}_preview.png    middle slice: cond | mean | EU | AU | |error| | label
    {output_dir}/{stem}/{stem}_metrics.json   quality and calibration metrics (cases with a reference)
    {output_dir}/metrics.csv                  one row per case of the folder, rebuilt after each case

A case is written into a hidden staging folder and renamed into place in one step, so a crash, a full disk or a
kill leaves either the whole case or nothing (a stale ``.{stem}.partial-*`` folder, removed by the next run), and
two runs writing the same case cannot mix their files: the second rename fails and says so.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import secrets
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor, NibabelWriter

from ..io import OVERWRITE_HINT, atomic_write, output_path, safe_stem
from .previews import write_preview

__all__ = ["CaseWriter", "save_map"]

logger = logging.getLogger("hyper_dm.writer")

_VARIANCES = ("eu", "au", "total")
_DESCRIPTIONS = {
    "mean": "hyper_dm posterior mean",
    "eu": "hyper_dm epistemic variance (units^2)",
    "au": "hyper_dm aleatoric variance (units^2)",
    "total": "hyper_dm total variance eu+au (units^2)",
    "eu_std": "hyper_dm epistemic standard deviation",
    "au_std": "hyper_dm aleatoric standard deviation",
    "total_std": "hyper_dm total standard deviation",
    "total_std_calibrated": "hyper_dm total std x split-conformal scale",
}


class CaseWriter:
    """Writes cases into ``output_dir`` atomically (see the module docstring).

    Args:
        output_dir: folder for every case (created if needed).
        overwrite: replace an existing case folder; otherwise an existing case is an error (see :meth:`pending`).
        write_std: also write the standard-deviation maps.
        previews: write the PNG preview of each case's middle slice.
    """

    def __init__(self, output_dir: str | os.PathLike, overwrite: bool = False, write_std: bool = False,
                 previews: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.overwrite, self.write_std, self.previews = bool(overwrite), bool(write_std), bool(previews)

    def case_dir(self, case_id: str) -> Path:
        """The folder of ``case_id`` (inside ``output_dir``, whatever the id holds)."""
        return output_path(self.output_dir, safe_stem(case_id), "")

    def pending(self, case_ids: Iterable[str], skip_existing: bool = False) -> list[str]:
        """The ``case_ids`` still to compute, checked before any work starts.

        An existing case is recomputed with ``overwrite``, left out with ``skip_existing`` (to finish an
        interrupted run), and otherwise an error listing the cases. Staging folders of writers that are no longer
        running (a killed run) are removed.
        """
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for stage in self.output_dir.glob(".*.partial-*"):
            if not _writer_alive(stage):
                shutil.rmtree(stage, ignore_errors=True)
        case_ids = list(case_ids)
        done = [c for c in case_ids if self.case_dir(c).exists()]
        if not done or self.overwrite:
            return case_ids
        if skip_existing:
            logger.info("skipping %d case(s) already in %s: %s", len(done), self.output_dir, ", ".join(done[:5]))
            return [c for c in case_ids if c not in done]
        names = ", ".join(done[:3]) + (f" and {len(done) - 3} more" if len(done) > 3 else "")
        raise FileExistsError(f"refusing to overwrite earlier results in {self.output_dir}: {names}; "
                              f"{OVERWRITE_HINT}, or inference_cfg#skip_existing=true to finish an interrupted run")

    def write(self, case_id: str, volumes: Mapping[str, MetaTensor], metrics: Mapping | None = None,
              preview: Mapping[str, np.ndarray] | None = None) -> Path:
        """Write ``volumes`` (``mean``, ``eu``, ``au``, ``total``: ``[1, X, Y, Z]`` MetaTensors with the source
        geometry), ``metrics`` and a ``preview`` (2-D arrays ``cond``/``label``, optional) as one case; return its
        folder. ``preview`` holds middle-slice 2-D maps (``mean``/``eu``/``au``/``cond``/``label``, any present) in
        the orientation the model saw. Non-finite values are refused, naming the case."""
        stem = safe_stem(case_id)
        final = self.case_dir(case_id)
        for name in ("mean", *_VARIANCES):
            if name not in volumes:
                raise KeyError(f"case {case_id}: no {name!r} volume to write")
            if not torch.isfinite(volumes[name]).all():
                raise ValueError(f"case {case_id}: the {name} volume holds NaN/infinite values (input out of range?); "
                                 "nothing written for this case")
        stage = output_path(self.output_dir, f".{stem}.partial-{os.getpid()}-{secrets.token_hex(4)}", "")
        stage.mkdir(parents=True)
        try:
            maps = dict(volumes)
            if self.write_std:
                maps.update({f"{v}_std": volumes[v].clamp_min(0).sqrt() for v in _VARIANCES})
            for name, volume in maps.items():
                if name in _DESCRIPTIONS:
                    _save_nifti(stage / f"{stem}_{name}.nii.gz", volume, _DESCRIPTIONS[name])
            if metrics is not None:
                (stage / f"{stem}_metrics.json").write_text(json.dumps(_finite(metrics), indent=2) + "\n")
            if self.previews:
                self._preview(stage / f"{stem}_preview.png", case_id, volumes, preview or {})
            self._commit(stage, final, case_id)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        if metrics is not None:
            self.update_table()
        logger.info("wrote case %s to %s", case_id, final)
        return final

    def _commit(self, stage: Path, final: Path, case_id: str) -> None:
        old = None
        if final.exists() and self.overwrite:
            old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
            os.rename(final, old)
        try:
            os.rename(stage, final)  # fails if another run put the case there meanwhile
        except OSError as e:
            raise FileExistsError(f"case {case_id}: {final} appeared while this run computed it (another run "
                                  f"writing to the same folder?); this run's result is discarded") from e
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _preview(self, path: Path, case_id: str, volumes: Mapping[str, MetaTensor], maps: Mapping) -> None:
        k = volumes["mean"].shape[-1] // 2
        mid = {name: maps[name] if name in maps else np.asarray(volumes[name][0, ..., k], dtype=np.float32)
               for name in ("mean", "eu", "au")}
        write_preview(path, mid["mean"], mid["eu"], mid["au"], cond=maps.get("cond"), target=maps.get("label"),
                      title=f"{case_id}  slice {k}")

    def attach(self, engine: Engine) -> None:
        """Write each case an Ignite engine puts in ``state.output`` (``case_id``, ``volumes``, ``metrics``,
        ``preview``; outputs without ``volumes``, such as skipped cases, are passed over)."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        if isinstance(out, Mapping) and out.get("volumes") is not None:
            self.write(out["case_id"], out["volumes"], out.get("metrics"), out.get("preview"))

    def update_table(self) -> Path:
        """Rebuild ``metrics.csv`` from every case's metrics JSON in ``output_dir`` (atomic); return its path."""
        rows = []
        for path in sorted(self.output_dir.glob("*/*_metrics.json")):
            try:
                rows.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as e:
                logger.warning("leaving %s out of metrics.csv: %s", path, e)
        fields = sorted({key for row in rows for key in row}, key=lambda f: (f != "case_id", f))
        table = output_path(self.output_dir, "metrics", ".csv")
        with atomic_write(table) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
        return table


def _writer_alive(stage: Path) -> bool:
    """Whether the process that named staging folder ``.<stem>.partial-<pid>-<token>`` still runs on this host."""
    try:
        pid = int(stage.name.rsplit(".partial-", 1)[1].split("-")[0])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def save_map(path: str | os.PathLike, volume: MetaTensor, name: str) -> None:
    """Write one output map ``name`` (``mean``, ``eu``, ``au``, ``total``, ...; ``[1, X, Y, Z]`` MetaTensor) as a
    float32 NIfTI with its geometry and description, on its own (not atomic: for files such as a server's reply)."""
    _save_nifti(Path(path), volume, _DESCRIPTIONS[name])


def _save_nifti(path: Path, volume: MetaTensor, description: str) -> None:
    """``[1, X, Y, Z]`` MetaTensor -> float32 NIfTI with its affine, through MONAI's ``NibabelWriter``."""
    header = nib.Nifti1Header()
    header["descrip"] = description.encode()[:79]
    header.set_xyzt_units("mm")
    writer = NibabelWriter(output_dtype=np.float32)
    writer.set_data_array(volume, channel_dim=0)
    writer.set_metadata(volume.meta, resample=False)
    writer.write(str(path), verbose=False, header=header)


def _finite(metrics: Mapping) -> dict:
    """JSON-safe metrics: non-finite floats become ``null``."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}

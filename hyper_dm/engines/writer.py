"""Write one reconstructed case whole, or not at all.

Layout (MONAI's ``SaveImage`` convention, one folder per case; ``{stem}`` checked by :func:`hyper_dm.io.safe_stem`)::

    {output_dir}/{stem}/{stem}_mean.nii.gz    posterior mean, physical units (CT: HU), the source's grid and geometry
    {output_dir}/{stem}/{stem}_eu.nii.gz      epistemic variance (units^2)
    {output_dir}/{stem}/{stem}_au.nii.gz      aleatoric variance (units^2)
    {output_dir}/{stem}/{stem}_total.nii.gz   eu + au
    {output_dir}/{stem}/{stem}_{eu,au,total}_std.nii.gz   square roots (write_std=True)
    {output_dir}/{stem}/{stem}_total_std_calibrated.nii.gz  calibrated total std (when a calibration is given)
    {output_dir}/{stem}/{stem}_unfamiliar.nii.gz  uint8 mask: 1 where EU, or its local contrast, exceeds the
                                              calibration's threshold (one that records it, see
                                              :mod:`hyper_dm.calibration`)
    {output_dir}/{stem}/{stem}_cond.nii.gz    the network's input (CT: sparse-view FBP, HU), when the evaluator
                                              is asked for it (``inference_cfg#write_cond``)
    {output_dir}/{stem}/{stem}_preview.png    middle slice: cond | mean | EU | AU | |error| | label
    {output_dir}/{stem}/{stem}_metrics.json   quality and calibration metrics (cases with a reference)
    {output_dir}/{stem}/{stem}_manifest.json  every file of the case with its size and SHA-256, the settings that
                                              made it (checkpoint and its SHA-256, M, N, steps, seed, ...) and,
                                              with a calibration, the input check (how unlike the calibration
                                              data the input is, per slice)
    {output_dir}/metrics.csv                  one row per case of the folder, rebuilt after each case
    {output_dir}/inference_summary.json       the last run: cases written, cases skipped and why

``suffixes`` renames the volume files (the export writes the mean as ``{stem}.nii.gz``, see :mod:`hyper_dm.export`).

A case is written into a hidden staging folder and renamed into place in one step, so a crash, a full disk or a
kill leaves either the whole case or nothing (a stale ``.{stem}.partial-*`` folder, removed by the next run), and
two runs writing the same case cannot mix their files: the second rename fails and says so. A run also holds an
exclusive lock on the folder (``.hyper_dm.lock``, released by the operating system when the process ends, even
killed), so a second run into the same folder is refused at once, naming the first one's process id. Under
``torch.distributed`` the ranks of one run share the folder: rank 0 holds the lock and records the run's token in it,
the other ranks check that record (a rank of another run finds another token and is refused).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor, NibabelWriter

from .. import __version__
from ..io import LOCK_NAME, atomic_write, lock_folder, output_path, overwrite_hint, safe_stem, sha256_file
from .distributed import from_rank0, rank_and_world
from .previews import write_preview

__all__ = ["MASKS", "CaseWriter", "save_map"]

logger = logging.getLogger("hyper_dm.writer")

_VARIANCES = ("eu", "au", "total")
MASKS = ("unfamiliar",)
"""Output maps that are masks: written as uint8, resampled nearest."""
_SUFFIX = re.compile(r"[A-Za-z0-9._+-]*")
_DESCRIPTIONS = {
    "mean": "hyper_dm posterior mean",
    "eu": "hyper_dm epistemic variance (units^2)",
    "au": "hyper_dm aleatoric variance (units^2)",
    "total": "hyper_dm total variance eu+au (units^2)",
    "eu_std": "hyper_dm epistemic standard deviation",
    "au_std": "hyper_dm aleatoric standard deviation",
    "total_std": "hyper_dm total standard deviation",
    "total_std_calibrated": "hyper_dm total std x split-conformal scale",
    "unfamiliar": "hyper_dm 1 where EU or its local contrast exceeds the calibration's threshold",
    "cond": "hyper_dm input: sparse-view FBP (CT) / zero-filled",
}


class CaseWriter:
    """Writes cases into ``output_dir`` atomically (see the module docstring).

    Args:
        output_dir: folder for every case (created if needed).
        overwrite: replace an existing case folder; otherwise an existing case is an error (see :meth:`pending`).
        write_std: also write the standard-deviation maps.
        previews: write the PNG preview of each case's middle slice.
        provenance: settings recorded in each case's manifest (a ``ckpt`` path also gets its SHA-256).
        suffixes: file-name suffix of a volume (before ``.nii.gz``) where it is not ``_{name}``, e.g.
            ``{"mean": ""}`` writes the mean as ``{stem}.nii.gz``; characters ``[A-Za-z0-9._+-]`` only.
    """

    def __init__(self, output_dir: str | os.PathLike, overwrite: bool = False, write_std: bool = False,
                 previews: bool = True, provenance: Mapping | None = None,
                 suffixes: Mapping[str, str] | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.overwrite, self.write_std, self.previews = bool(overwrite), bool(write_std), bool(previews)
        self.provenance = dict(provenance or {})
        ckpt = self.provenance.get("ckpt")
        if ckpt and Path(ckpt).is_file():
            self.provenance["ckpt_sha256"] = sha256_file(Path(ckpt))
        self._lock_fd: int | None = None
        self.already_written: list[str] = []  # cases :meth:`pending` found written and left (skip_existing)
        self.suffixes = {name: f"_{name}" for name in _DESCRIPTIONS}
        for name, suffix in (suffixes or {}).items():
            if name not in _DESCRIPTIONS or not isinstance(suffix, str) or not _SUFFIX.fullmatch(suffix):
                raise ValueError(f"CaseWriter suffixes: {name!r}: {suffix!r} is not a volume name of "
                                 f"{sorted(_DESCRIPTIONS)} with a suffix of characters [A-Za-z0-9._+-]")
            self.suffixes[name] = suffix
        if len(set(self.suffixes.values())) != len(self.suffixes):
            raise ValueError(f"CaseWriter suffixes give two volumes the same file name: {self.suffixes}")

    def volume_path(self, case_id: str, name: str) -> Path:
        """Where the volume ``name`` (``mean``, ``eu``, ...) of ``case_id`` is (or will be) written."""
        stem = safe_stem(case_id)
        return self.case_dir(case_id) / f"{stem}{self.suffixes[name]}.nii.gz"

    def lock(self) -> None:
        """Take the folder's exclusive lock for this run (once); another run holding it is an error. The holder
        removes the staging folders of writers that are no longer running (a killed run).

        Under ``torch.distributed`` every rank calls it (a collective): rank 0 takes the lock, the other ranks
        check that the lock file names this run.
        """
        if self._lock_fd is not None:
            return
        rank, _ = rank_and_world()
        run = from_rank0(self._take_lock)  # "<pid> <token>", as written into the lock file
        if rank == 0:
            return
        path = self.output_dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(f"rank {rank} does not see {path}, which rank 0 holds: the output folder must be "
                                    "on a file system every rank shares") from None
        record = os.pread(fd, 128, 0).decode(errors="replace").strip()
        if record != run:
            os.close(fd)
            raise FileExistsError(f"rank {rank}: {path} names the run {record!r}, not this run {run!r}; another run "
                                  "is writing into the folder")
        self._lock_fd = fd

    def _take_lock(self) -> str:
        """:func:`~hyper_dm.io.lock_folder` of the output folder; returns the run's record."""
        self._lock_fd, run = lock_folder(self.output_dir)
        for stage in self.output_dir.glob(".*.partial-*"):
            if not _writer_alive(stage):
                shutil.rmtree(stage, ignore_errors=True)
        return run

    def case_dir(self, case_id: str) -> Path:
        """The folder of ``case_id`` (inside ``output_dir``, whatever the id holds)."""
        return output_path(self.output_dir, safe_stem(case_id), "")

    def pending(self, case_ids: Iterable[str], skip_existing: bool = False) -> list[str]:
        """The ``case_ids`` still to compute, checked before any work starts.

        An existing case is recomputed with ``overwrite``, left out with ``skip_existing`` (to finish an
        interrupted run; listed in :attr:`already_written`), and otherwise an error listing the cases. Takes the
        folder's lock first (:meth:`lock`).
        """
        self.lock()
        case_ids = list(case_ids)
        done = [c for c in case_ids if self.case_dir(c).exists()]
        self.already_written = []
        if not done or self.overwrite:
            return case_ids
        if skip_existing:
            logger.info("skipping %d case(s) already in %s: %s", len(done), self.output_dir, ", ".join(done[:5]))
            self.already_written = done
            return [c for c in case_ids if c not in done]
        names = ", ".join(done[:3]) + (f" and {len(done) - 3} more" if len(done) > 3 else "")
        raise FileExistsError(f"refusing to overwrite earlier results in {self.output_dir}: {names}; "
                              f"{overwrite_hint('inference')}; to finish an interrupted run, skip them: "
                              "inference.skip_existing=true (scripts/infer.py), --inference_cfg#skip_existing True "
                              "(bundle)")

    def write(self, case_id: str, volumes: Mapping[str, MetaTensor], metrics: Mapping | None = None,
              preview: Mapping[str, np.ndarray] | None = None, input_check: Mapping | None = None) -> Path:
        """Write ``volumes`` (``mean``, ``eu``, ``au``, ``total``: ``[1, X, Y, Z]`` MetaTensors with the source
        geometry), ``metrics`` and a ``preview`` (2-D arrays ``cond``/``label``, optional) as one case; return its
        folder. ``preview`` holds middle-slice 2-D maps (``mean``/``eu``/``au``/``cond``/``label``, any present) in
        the orientation the model saw; ``input_check`` goes into the manifest. Non-finite values are refused,
        naming the case."""
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
                    _save_nifti(stage / f"{stem}{self.suffixes[name]}.nii.gz", volume, name)
            if metrics is not None:
                (stage / f"{stem}_metrics.json").write_text(json.dumps(_finite(metrics), indent=2) + "\n")
            if self.previews:
                self._preview(stage / f"{stem}_preview.png", case_id, volumes, preview or {})
            files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in sorted(stage.iterdir())}
            manifest = {"case_id": case_id, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "hyper_dm": __version__, "settings": self.provenance, "files": files}
            if input_check is not None:
                manifest["input_check"] = dict(input_check)
            (stage / f"{stem}_manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
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
        ``preview``, ``input_check``; outputs without ``volumes``, such as skipped cases, are passed over)."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        if isinstance(out, Mapping) and out.get("volumes") is not None:
            self.write(out["case_id"], out["volumes"], out.get("metrics"), out.get("preview"), out.get("input_check"))

    def write_summary(self, summary: Mapping) -> Path:
        """``summary`` as ``inference_summary.json`` in ``output_dir`` (atomic); returns its path."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = output_path(self.output_dir, "inference_summary", ".json")
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
        return path

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
    NIfTI with its geometry and description, on its own (not atomic: for files such as a server's reply)."""
    _save_nifti(Path(path), volume, name)


def _save_nifti(path: Path, volume: MetaTensor, name: str) -> None:
    """Output map ``name`` (``[1, X, Y, Z]`` MetaTensor) -> NIfTI with its affine and description, through MONAI's
    ``NibabelWriter``: float32, masks uint8."""
    dtype = np.uint8 if name in MASKS else np.float32
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header["descrip"] = _DESCRIPTIONS[name].encode()[:79]
    header.set_xyzt_units("mm")
    writer = NibabelWriter(output_dtype=dtype)
    writer.set_data_array(volume, channel_dim=0)
    writer.set_metadata(volume.meta, resample=False)
    writer.write(str(path), verbose=False, header=header)


def _finite(metrics: Mapping) -> dict:
    """JSON-safe metrics: non-finite floats become ``null``."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}

"""What the user points inference at: one file, a folder, or a Decathlon-style datalist JSON -> case entries.

A case is one volume: a LUNA16 ``.mhd`` series, a NIfTI file, a DICOM series folder (CT) or a fastMRI ``.h5``
file (MRI). Each entry is ``{"image": <absolute path>, "case_id": <output stem>}`` plus whatever else a datalist
entry carried (e.g. the acquisition it states: ``n_views``). Output stems are checked by
:func:`hyper_dm.io.safe_stem` (a stem derived from a file name is made safe by :func:`hyper_dm.io.file_stem`).
Inputs whose derived stems coincide (``case one.mhd`` and ``case_one.mhd``) each get a short hash of their path
appended, the same on every run; two datalist entries given the same ``case_id`` are an error naming both.

Example::

    >>> find_cases("scans/", task="ct")                      # every series in the folder
    >>> find_cases("scans/patient7.nii.gz", task="ct")       # one file
    >>> find_cases("my_datalist.json", task="mri")           # {"testing": [{"image": "file1.h5"}, ...]}
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from pathlib import Path

from ..data.datalist import datalist_split
from ..data.validation import BadInputError
from ..io import file_stem, safe_stem

__all__ = ["CT_SUFFIXES", "MRI_SUFFIXES", "case_id_of", "find_cases", "is_dicom_folder"]

CT_SUFFIXES = (".mhd", ".nii", ".nii.gz")
MRI_SUFFIXES = (".h5",)
DATALIST_KEYS = ("testing", "test", "validation", "training")

logger = logging.getLogger(__name__)


def is_dicom_folder(path: Path) -> bool:
    """A folder holding at least one file with the DICOM preamble (``DICM`` at byte 128)."""
    for child in sorted(path.iterdir())[:64]:
        if child.is_file():
            with open(child, "rb") as f:
                if f.read(132)[128:] == b"DICM":
                    return True
    return False


def case_id_of(path: Path) -> str:
    """Output stem of an input: the file name less its image suffix, or the DICOM folder's name."""
    name = path.name
    for suffix in (*CT_SUFFIXES, *MRI_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _volume_files(folder: Path, task: str) -> list[Path]:
    suffixes = CT_SUFFIXES if task == "ct" else MRI_SUFFIXES
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes)
                   and not p.name.startswith("."))
    if task == "ct":
        files += sorted(p for p in [folder, *folder.rglob("*")] if p.is_dir() and is_dicom_folder(p))
    return files


def _datalist_entries(path: Path) -> list[dict]:
    key, items = datalist_split(path, DATALIST_KEYS, '{"image": <path>}')
    entries = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            raise BadInputError(path, f'entry {i} of "{key}" needs an "image" path, got {item!r}')
        image = Path(item["image"])
        entries.append({**item, "image": str(image if image.is_absolute() else (path.parent / image))})
    return entries


def find_cases(source: str | Path, task: str) -> list[dict]:
    """Case entries for ``source`` (a volume file, a DICOM folder, a folder of volumes, or a datalist ``.json``).

    Raises :class:`BadInputError` naming ``source`` when nothing usable is found. A datalist entry whose file is
    missing is kept: loading it fails later with an error naming it (and ``on_bad_file: skip`` skips it).
    """
    if task not in ("ct", "mri"):
        raise ValueError(f"task must be 'ct' or 'mri', got {task!r}")
    source = Path(source).expanduser()
    if not source.exists():
        raise BadInputError(source, "inference input does not exist; give a volume file, a folder of volumes, "
                                    "a DICOM series folder or a datalist JSON (inference_cfg#input)")
    if source.is_file() and source.suffix.lower() == ".json":
        entries = _datalist_entries(source)
    elif source.is_dir() and not (task == "ct" and is_dicom_folder(source)):
        entries = [{"image": str(p)} for p in _volume_files(source, task)]
        if not entries:
            kinds = "LUNA16 .mhd, NIfTI .nii/.nii.gz or DICOM series folders" if task == "ct" else "fastMRI .h5 files"
            raise BadInputError(source, f"no {kinds} found in this folder (task {task!r})")
    else:
        entries = [{"image": str(source)}]
    given = set()
    for i, entry in enumerate(entries):
        entry["image"] = str(Path(entry["image"]).resolve())
        if entry.get("case_id"):
            entry["case_id"] = safe_stem(str(entry["case_id"]))
            given.add(i)
        else:
            entry["case_id"] = file_stem(case_id_of(Path(entry["image"])))
    groups: dict[str, list[int]] = defaultdict(list)
    for i, entry in enumerate(entries):
        groups[entry["case_id"]].append(i)
    for stem, members in groups.items():
        if len(members) < 2:
            continue
        if len(given.intersection(members)) > 1:
            a, b = (entries[i]["image"] for i in sorted(given.intersection(members))[:2])
            raise BadInputError(b, f'its datalist "case_id" {stem!r} is also that of {a}; give distinct case ids')
        for i in set(members) - given:
            entries[i]["case_id"] = f"{stem}_{hashlib.sha1(entries[i]['image'].encode()).hexdigest()[:6]}"
        logger.warning("%d inputs share the output name %r; each derived name gets a hash of its path: %s",
                       len(members), stem, ", ".join(entries[i]["case_id"] for i in members))
    return entries

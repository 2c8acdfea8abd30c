"""Decathlon-style datalist JSON files and the hash split of cases by patient.

A datalist (``{"training": [...], "validation": [...], "test": [...]}``, entries ``{"image": <path relative to the
file>}``) fixes which case goes where; without one, :func:`split_of` puts each patient in a split as a pure function
of its id and ``split_seed``, so adding, removing or skipping a file never moves another case.

Example::

    >>> split_of("1.3.6.1.4.1.14519.5.2.1.6279.6001.105756658031515062000744821260", 0, 0.7, 0.15)
    'training'
    >>> write_datalist("data/LUNA16", {"training": [...], "validation": [...], "test": [...]})
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..io import atomic_write
from .validation import BadInputError

__all__ = ["DATALIST_NAME", "SPLITS", "datalist_split", "read_datalist", "split_of", "write_datalist"]

SPLITS = ("training", "validation", "test")
DATALIST_NAME = "datalist.json"


def split_of(patient_id: str, split_seed: int, train_frac: float, val_frac: float) -> str:
    """``"training"``, ``"validation"`` or ``"test"`` for ``patient_id``: a uniform hash in [0, 1) cut at
    ``train_frac`` and ``train_frac + val_frac``."""
    digest = hashlib.sha256(f"{int(split_seed)}:{patient_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return SPLITS[0] if u < train_frac else SPLITS[1] if u < train_frac + val_frac else SPLITS[2]


def write_datalist(root: str | os.PathLike, splits: Mapping[str, Sequence[str | os.PathLike]],
                   name: str = DATALIST_NAME) -> Path:
    """Write ``root/name`` with each split's image paths relative to ``root`` (atomic); return its path."""
    root = Path(root)
    content = {split: [{"image": os.path.relpath(Path(p).resolve(), root.resolve())} for p in splits.get(split, [])]
               for split in SPLITS}
    path = root / name
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2) + "\n")
    return path


def read_datalist(path: str | os.PathLike) -> dict[str, list[Path]]:
    """``{split: [absolute image paths]}`` from a datalist JSON (paths relative to its folder); the keys ``test``
    and ``testing`` are the same split."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(path, f"is not a readable JSON datalist ({e})") from e
    if not isinstance(content, dict) or not any(k in content for k in (*SPLITS, "testing")):
        raise BadInputError(path, f"a datalist needs lists under {list(SPLITS)} of {{\"image\": <path>}} entries")
    out = {}
    for split in SPLITS:
        entries = content.get(split, content.get("testing", []) if split == "test" else [])
        paths = []
        for i, item in enumerate(entries):
            if not isinstance(item, dict) or not isinstance(item.get("image"), str):
                raise BadInputError(path, f'entry {i} of "{split}" needs an "image" path, got {item!r}')
            image = Path(item["image"])
            paths.append(image if image.is_absolute() else (path.parent / image).resolve())
        out[split] = paths
    return out


def datalist_split(path: Path, keys: Sequence[str], entry: str) -> tuple[str, list]:
    """The first of ``keys`` a Decathlon-style JSON datalist holds, and its list; an unreadable file or none of the
    keys is a :class:`BadInputError` naming ``path`` and the expected ``entry`` form (e.g. ``{"image": <path>}``)."""
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(path, f"is not a readable JSON datalist ({e})") from e
    key = next((k for k in keys if isinstance(content, dict) and k in content), None)
    if key is None or not isinstance(content[key], list):
        raise BadInputError(path, f"a datalist needs one of the keys {list(keys)} holding a list of {entry} entries "
                                  "(Decathlon style)")
    return key, content[key]

"""Output files: atomic writes, file stems that stay inside the output directory, no silent overwrites, one run
per output folder.

Example::

    >>> stem = safe_stem("subset0_1.3.6.1.4")
    >>> path = output_path("results/ct", stem, "_mean.nii.gz")
    >>> check_no_overwrite([path], overwrite=False, section="findings")
    >>> with atomic_write(path) as tmp:
    ...     nib.save(image, tmp)  # any writer that takes a path: nibabel, json, csv, matplotlib
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_write", "check_no_overwrite", "file_stem", "lock_folder", "output_path", "overwrite_hint", "safe_stem",
    "sha256_file",
]

LOCK_NAME = ".hyper_dm.lock"

_MAX_STEM = 200  # leaves room for the longest suffix within the 255-byte file-name limit
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    The temporary file is ``.<random>.<name>`` in the same directory (same file system, same extension, so
    nibabel and matplotlib pick the format from it). Readers never see a partial file: on any exception
    the temporary file is removed and ``path`` is left as it was. The new file gets the usual permissions
    (``0o666`` less the umask).
    """
    path = Path(path)
    tmp = path.with_name(f".{secrets.token_hex(6)}.{path.name}")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def safe_stem(name: str) -> str:
    """Validate a case id (e.g. a LUNA16 series UID or a fastMRI file stem) as a file stem.

    Raises ``ValueError`` for anything that could address another directory or a hidden or unnamed file:
    empty names, path separators (``/``, ``\\``), absolute paths, ``.``/``..``, a leading ``.``, control
    characters, or names longer than 200 characters. Any other character outside ``[A-Za-z0-9._+-]``
    (spaces, ``:``) becomes ``_``.

    Example::

        >>> safe_stem("subset0_1.3.6.1.4")
        'subset0_1.3.6.1.4'
        >>> safe_stem("knee file:1")
        'knee_file_1'
    """
    if not isinstance(name, str):
        raise ValueError(f"case id must be a string, got {type(name).__name__} {name!r}")
    problem = None
    if not name.strip():
        problem = "it is empty"
    elif "/" in name or "\\" in name or os.path.isabs(name):
        problem = "it contains a path separator (a case id names a file, not a path)"
    elif name.startswith("."):
        problem = "it starts with '.' (would be '.', '..' or a hidden file)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "it contains control characters"
    elif len(name) > _MAX_STEM:
        problem = f"it is longer than {_MAX_STEM} characters"
    if problem:
        raise ValueError(f"case id {name!r} cannot be used as an output file name: {problem}")
    return _UNSAFE.sub("_", name)


def file_stem(name: str) -> str:
    """A safe output stem derived from an input file name: like :func:`safe_stem`, but a leading ``.`` becomes
    ``_`` and a name over the length limit is cut and given a short hash of the whole name, instead of an error.

    Example::

        >>> file_stem(".hidden scan")
        '_hidden_scan'
    """
    stem = _UNSAFE.sub("_", name)
    stem = "_" + stem[1:] if stem.startswith(".") else stem
    if len(stem) > _MAX_STEM:
        stem = f"{stem[:_MAX_STEM - 9]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return safe_stem(stem)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def output_path(out_dir: str | os.PathLike, stem: str, suffix: str) -> Path:
    """``out_dir / (stem + suffix)``, resolved; ``ValueError`` unless it lies directly inside ``out_dir``.

    Symbolic links are followed, so a link planted in ``out_dir`` that points elsewhere is refused too.
    """
    root = Path(out_dir).resolve()
    path = (root / f"{stem}{suffix}").resolve()
    if path.parent != root:
        raise ValueError(f"output name {stem + suffix!r} resolves to {path}, outside the output directory {root}")
    return path


def overwrite_hint(section: str) -> str:
    """How to replace earlier results of the run whose settings are config ``section`` (``inference``,
    ``findings``, ``training``), in each of the ways a run is started."""
    script = {"inference": "infer", "training": "train"}.get(section, section)
    return (f"pass --overwrite (python scripts/{script}.py), "
            f"--{section}_cfg#overwrite True (python -m monai.bundle run) or overwrite=True (Python), or choose "
            "another output directory")


def check_no_overwrite(paths: Iterable[str | os.PathLike], overwrite: bool, section: str) -> None:
    """Raise ``FileExistsError`` naming the existing files among ``paths`` unless ``overwrite``; the message says
    how to overwrite for the run of config ``section`` (:func:`overwrite_hint`)."""
    if overwrite:
        return
    existing = [str(p) for p in paths if os.path.lexists(p)]
    if existing:
        names = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise FileExistsError(f"refusing to overwrite earlier results: {names} already exist(s); "
                              f"{overwrite_hint(section)}")


def lock_folder(folder: str | os.PathLike) -> tuple[int, str]:
    """Take the exclusive lock of ``folder`` (created if needed) for this run: ``flock`` on its ``.hyper_dm.lock``,
    into which the run's record ``"<pid> <token>"`` is written. Returns the open file descriptor (the lock lasts
    while it is open; the operating system releases it when the process ends, even killed) and the record.
    ``FileExistsError`` names the process of another run holding it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = (os.pread(fd, 128, 0).decode(errors="replace").split() or ["?"])[0]
        os.close(fd)
        raise FileExistsError(f"another run (process {holder}) is writing into {folder}; wait for it to finish or "
                              "choose another output folder") from None
    run = f"{os.getpid()} {secrets.token_hex(8)}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{run}\n".encode(), 0)
    return fd, run

"""Checkpoint files: atomic saving, the records a resumed run continues, and checked loading.

- :class:`AtomicCheckpointSaver`: MONAI's ``CheckpointSaver`` with atomic writes. MONAI 1.6.1 saves with Ignite's
  ``DiskSaver(atomic=False)`` (to keep group/other read permission), so a run killed while saving leaves a partial
  ``.pt`` that a resume cannot load; here every file is written to a temporary name in the same folder and renamed
  into place (Ignite's ``atomic=True`` path, which also adds group/other read permission). Its ``state_dict`` is the
  Ignite record of the files it keeps (``_saved``: ``(priority, filename)`` pairs), so ``n_saved`` pruning and the
  best key metric carry on across a resume; ``config`` is stored in every file it writes.
- :func:`read_checkpoint`: ``torch.load(weights_only=True)`` whose every failure names the file, and which compares
  the stored config with the current one (:func:`check_config`).
- :class:`CheckpointLoader`: MONAI's loader reading through :func:`read_checkpoint`.
- :func:`write_ensemble`: K trained models' checkpoints as one deep-ensemble checkpoint.
- :func:`claim_training_folder`: a run starts only in a folder free of another run's model, checkpoints and logs.

A config record is the plain dict of the values the weights depend on (``checkpoint_config`` in ``common.yaml``:
task, image size, the model section, the diffusion process); keys are compared flattened to bundle ids
(``model#z_dim``). Checkpoints without a record (written before it existed, or by other code) load with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader as MonaiCheckpointLoader
from monai.handlers import CheckpointSaver

from ..data.validation import BadInputError
from ..io import atomic_write, lock_folder, overwrite_hint
from .distributed import from_rank0

__all__ = ["AtomicCheckpointSaver", "CheckpointLoader", "check_config", "claim_training_folder", "read_checkpoint",
           "write_ensemble"]

logger = logging.getLogger(__name__)

CONFIG_KEY = "config"  # the checkpoint entry holding the config record
# record keys added later: what a record without them was written with
ADDED_KEYS = {"model#noise_level_input": False, "model#ensemble_members": 1}
_HELD: dict[Path, int] = {}  # the training folders whose locks this process holds, with their descriptors


class _AtomicDiskSaver(DiskSaver):
    """Ignite ``DiskSaver(atomic=True)`` with an optional fixed file name (as MONAI's own saver has)."""

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def remove(self, filename: str) -> None:
        super().remove(self.filename or filename)


class _Record:
    """A plain dict in a ``save_dict`` (Ignite saves ``state_dict()`` of every entry)."""

    def __init__(self, values: Mapping) -> None:
        self.values = dict(values)

    def state_dict(self) -> dict:
        return self.values


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` (same arguments) with atomic writes of every checkpoint it saves.

    Args:
        config: a config record stored as ``"config"`` in every file (plain values only).
        interval_save_state: store the record of the interval checkpoints kept so far (itself included) as
            ``"checkpointer"`` in each of them (Ignite's ``include_self``) and in the final one, for
            :meth:`load_state_dict` on resume.
        kwargs: ``monai.handlers.CheckpointSaver`` arguments.

    ``state_dict()``/``load_state_dict()`` hold the Ignite ``Checkpoint`` record ``{"_saved": [(priority, filename),
    ...]}`` of the interval checkpoints when ``interval_save_state``, else of the key-metric ones (the record MONAI's
    own ``load_state_dict`` restores): put a key-metric saver in the training ``save_dict`` and a resumed run replaces
    its file only with a better model.
    """

    def __init__(self, save_dir: str, save_dict: dict, config: Mapping | None = None,
                 interval_save_state: bool = False, **kwargs) -> None:
        if config is not None:
            save_dict = {**save_dict, CONFIG_KEY: _Record(config)}
        super().__init__(save_dir, save_dict, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, checkpoint.save_handler.filename)
        if interval_save_state and self._interval_checkpoint is None:
            raise ValueError("interval_save_state needs save_interval > 0")
        if interval_save_state:
            self._interval_checkpoint.include_self = True  # the record as updated by this save
            if self._final_checkpoint is not None:  # the final file carries it too, so a run can go on from there
                self._final_checkpoint.to_save = {**self._final_checkpoint.to_save, "checkpointer": self}
        self._record = self._interval_checkpoint if interval_save_state else self._key_metric_checkpoint

    def state_dict(self) -> dict:
        """The record of the files this saver keeps (see the class docstring)."""
        if self._record is None:
            raise ValueError("this saver keeps no record: set save_key_metric or interval_save_state")
        return dict(self._record.state_dict())

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Continue from a record of :meth:`state_dict` (or of Ignite's ``include_self``)."""
        if self._record is None:
            raise ValueError("this saver keeps no record: set save_key_metric or interval_save_state")
        self._record.load_state_dict(state_dict)


def _flat(record: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"z_dim": 8}}`` -> ``{"model#z_dim": 8}``; sequences compare as lists."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{name}#"))
        else:
            out[name] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def check_config(saved: Mapping, config: Mapping, path: str | Path) -> None:
    """Raise :class:`BadInputError` naming ``path``, and each key with both values, where the checkpoint's config
    record ``saved`` and the current ``config`` differ (keys in only one of them are not compared, except
    :data:`ADDED_KEYS`, which a record written before them holds at their former value)."""
    saved_flat, current = {**ADDED_KEYS, **_flat(saved)}, _flat(config)
    keys = [key for key in current if key in saved_flat and saved_flat[key] != current[key]]
    differences = [f"{key} is {saved_flat[key]!r} in the checkpoint but {current[key]!r} in this config"
                   for key in keys]
    if any(isinstance(saved_flat[key], bool) and isinstance(current[key], str) for key in keys):
        differences.append("a boolean given as the string 'true' / 'false': the monai.bundle command line reads "
                           "Python literals, write True / False")
    if differences:
        raise BadInputError(path, "was written for another configuration: " + "; ".join(differences)
                            + " (use the config it was trained with, e.g. override those keys)")


def read_checkpoint(path: str | Path, map_location: Any = "cpu", config: Mapping | None = None) -> Any:
    """``torch.load(path, weights_only=True)``; a missing, truncated or foreign file is an error naming ``path``, and
    with ``config`` a checkpoint recorded for another config is too (:func:`check_config`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; train first or give an existing checkpoint")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated or foreign files raise several types
        raise BadInputError(path, f"is not a readable Hyper-DM checkpoint, truncated or not a torch.save file "
                                  f"({type(e).__name__}: {e})") from e
    if config is not None:
        saved = checkpoint.get(CONFIG_KEY) if isinstance(checkpoint, Mapping) else None
        if isinstance(saved, Mapping):
            check_config(saved, config, path)
        else:
            logger.warning("%s carries no config record; its fit to this config is not checked", path)
    return checkpoint


class CheckpointLoader(MonaiCheckpointLoader):
    """``monai.handlers.CheckpointLoader`` (strict) that reads with :func:`read_checkpoint`: every failure names the
    file, and with ``config`` a checkpoint written for another config is refused before anything is loaded.

    Args:
        load_path: the checkpoint.
        load_dict: objects to restore, e.g. ``{"hypernet": network, "optimizer": optimizer}``.
        config: the current config record (``checkpoint_config``), or ``None`` to skip the check.
        name, map_location: as ``monai.handlers.CheckpointLoader``.
    """

    def __init__(self, load_path: str, load_dict: dict, config: Mapping | None = None, name: str | None = None,
                 map_location: Any = None) -> None:
        super().__init__(load_path, load_dict, name=name, map_location=map_location)
        self.config = config

    def __call__(self, engine: Engine) -> None:
        checkpoint = read_checkpoint(self.load_path, self.map_location, self.config)
        several = isinstance(checkpoint, Mapping) and len(self.load_dict) > 1
        missing = [key for key in self.load_dict if key not in checkpoint] if several else []
        if missing:
            raise BadInputError(self.load_path, f"has no {', '.join(map(repr, missing))} entries (it holds "
                                                f"{', '.join(map(repr, checkpoint))}): not a checkpoint of this "
                                                "workflow and version; resume from an epoch checkpoint it wrote")
        prior_max_epochs = engine.state.max_epochs  # the configured length wins over the checkpoint's (as MONAI)
        try:
            Checkpoint.load_objects(to_load=self.load_dict, checkpoint=checkpoint, strict=True)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise BadInputError(self.load_path, f"does not fit this run ({type(e).__name__}: {e})") from e
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise BadInputError(self.load_path, f"is at epoch {engine.state.epoch}, beyond the {prior_max_epochs} "
                                                "epochs of this run; raise training_cfg#epochs to train on")
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"Restored all variables from {self.load_path}")


def claim_training_folder(output_dir: str | Path, ckpt_dir: str | Path, log_dir: str | Path,
                          resume: str | None = None, overwrite: bool = False) -> None:
    """Refuse (``FileExistsError`` naming the files) to start a training run where another run left its outputs:
    ``model.pt`` in ``output_dir`` (the model inference reads, e.g. the shipped one), checkpoints (``*.pt``) in
    ``ckpt_dir``, TensorBoard event files in ``log_dir``; a run would replace the model at its first validation and
    mix its checkpoints and curves with the other run's. A ``resume`` continues its run and may. An event file
    holding nothing but its version record is no run's: a start that failed (a config error while the trainer was
    built) leaves one, and it is removed, so the corrected command runs in the same folder. Then the folder's
    lock (:func:`~hyper_dm.io.lock_folder`) is taken and held until the process ends, so a second run started
    meanwhile is refused too (a later run in the same process, e.g. a notebook's, keeps the lock it holds); with
    ``overwrite`` the other run's checkpoints and event files are removed after it, and its ``model.pt`` is replaced
    at the new run's first validation. Checked on rank 0 under ``torch.distributed`` (every rank raises if it
    fails)."""
    model = Path(output_dir) / "model.pt"

    def claim() -> None:
        events = sorted(Path(log_dir).glob("events.out.tfevents.*"))
        empty = [p for p in events if not _holds_records(p)]
        files = sorted(Path(ckpt_dir).glob("*.pt")) + [p for p in events if p not in empty]
        earlier = [] if resume else [model] * model.is_file() + [p for p in files if p != model]
        if earlier and not overwrite:
            names = ", ".join(map(str, earlier[:3])) + (f" and {len(earlier) - 3} more" if len(earlier) > 3 else "")
            raise FileExistsError(f"refusing to train into {output_dir}: it holds another run's {names}; choose "
                                  "another output folder (--output_dir DIR with python -m monai.bundle run, "
                                  "--outdir DIR with scripts/train.py), continue that run (training_cfg#resume "
                                  f"<checkpoint>) or replace it: {overwrite_hint('training')}")
        folder = Path(output_dir).resolve()
        if folder not in _HELD:
            _HELD[folder] = lock_folder(folder)[0]  # held while this process runs (the OS releases it)
        for path in empty:  # removed under the lock: no other run is writing here
            path.unlink(missing_ok=True)
        if not earlier:
            return
        for path in earlier:
            if path != model:  # replaced at this run's first validation, not before
                path.unlink()
        logger.warning("training_cfg#overwrite: removed the earlier run's checkpoints and TensorBoard logs in %s; "
                       "its model.pt, if any, is replaced at this run's first validation", output_dir)

    from_rank0(claim)


def _holds_records(events_file: Path) -> bool:
    """Whether a TensorBoard event file holds anything besides the ``file_version`` record a ``SummaryWriter``
    writes when it is created (an unreadable file counts as holding records: it is never removed unasked)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    try:
        events = LegacyEventFileLoader(str(events_file)).Load()
        return any(event.WhichOneof("what") != "file_version" for event in events)
    except Exception:  # noqa: BLE001 - any failure to read it: keep it and let the claim name it
        return True


def write_ensemble(members: list[str | Path], path: str | Path) -> dict:
    """Write the checkpoints ``members`` (K >= 2 models trained apart, one config record) as the deep-ensemble
    checkpoint ``path``: ``{"hypernet": members.<i>.<name> -> tensor, "config": the record with
    model.ensemble_members = K}``, which the bundle loads with ``model#ensemble_members`` K
    (:class:`~hyper_dm.networks.DeepEnsemble`). Returns the record. A member that is itself an ensemble, lacks a
    record or records another config than the first is an error naming it."""
    if len(members) < 2:
        raise ValueError(f"a deep ensemble needs at least 2 member checkpoints, got {len(members)}")
    states, record = {}, None
    for i, member in enumerate(members):
        checkpoint = read_checkpoint(member, config=record)
        if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get(CONFIG_KEY), Mapping) \
                or "hypernet" not in checkpoint:
            raise BadInputError(member, "is not a model checkpoint with a config record ('hypernet' and 'config' "
                                        "entries, as training's model.pt)")
        if record is None:
            record = checkpoint[CONFIG_KEY]
        if _flat(checkpoint[CONFIG_KEY]).get("model#ensemble_members", 1) != 1:
            raise BadInputError(member, "is already a deep ensemble; give the single models it was made of")
        states.update({f"members.{i}.{name}": tensor for name, tensor in checkpoint["hypernet"].items()})
    record = {**record, "model": {**record["model"], "ensemble_members": len(members)}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save({"hypernet": states, CONFIG_KEY: record}, tmp)
    return record

"""The inference workflow over whole cases: a MONAI dataset of cases, an Ignite evaluator, per-case metrics.

``python -m monai.bundle run inference`` builds these from ``inference.yaml``; :func:`case_entries` decides what
runs (the user's file / folder / datalist, or the ``test`` split of the training-style dataset as a benchmark),
:class:`CaseDataset` loads each case (bad ones skipped with ``on_bad_file: skip``), :class:`VolumeEvaluator`
reconstructs it and puts ``volumes`` and ``metrics`` in ``engine.state.output``, and the attached
:class:`~hyper_dm.engines.writer.CaseWriter` writes it whole.
"""

from __future__ import annotations

import logging
import re
import resource
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from ignite.engine import Events
from monai.data import Dataset
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents
from torch.utils.data import ConcatDataset

from ..calibration import (
    LEVELS,
    LOCAL_EU_REFERENCE,
    Calibration,
    eu_in_model_units,
    fit_calibration,
    holdout_coverage,
    in_model_units,
    intensity_classes_valid,
    local_eu_contrast,
    slice_samples,
    standardised_residuals,
)
from ..data.config import MEASUREMENT_NOISE, dataset_root, fastmri_center_fraction, resolve_data_config
from ..data.datasets import split_cases
from ..data.validation import BadFileLog, BadInputError
from ..engines.distributed import from_rank0, gather, rank_and_world
from ..engines.writer import CaseWriter
from ..io import atomic_write, safe_stem, sha256_file
from ..uncertainty import ause, gaussian_coverage, gaussian_crps, psnr, ssim, uce
from .calibrated import apply_calibration, mask_acceleration, scale_like_calibration
from .inputs import case_id_of, find_cases
from .loading import InputMode, load_case, to_source_layout
from .reconstructor import VolumeReconstructor, resize_slices

__all__ = ["CalibrationFitter", "CaseDataset", "VolumeEvaluator", "calibration_dataset", "calibration_holdout",
           "case_entries", "case_metrics", "input_entries", "run_inference", "scale_ratio_cases"]

logger = logging.getLogger("hyper_dm.inference")

FEW_CALIBRATION_CASES = 3  # fewer validation cases than this: the calibration describes too few patients
RATIO_FILES = 32  # MRI: files the calibration's zero-filled scale ratio is measured on, at most
_METRIC_PIXELS = 1 << 21  # AUSE / UCE on at most this many pixels (a fixed stride), the rest on all
_CALIBRATION_ID = re.compile(r"(?P<patient>.+)_(?P<measurement>(?:i0|kspace_noise)[0-9.e+-]+"
                             r"(?:_[a-z]+_pitch|_(?P<acceleration>[0-9.]+x))?)")  # calibration_dataset's case ids


def input_entries(data: Mapping, source: str | None) -> list[dict]:
    """Every case of ``source`` (file, folder, datalist JSON) or, when ``None``, of the ``test`` split of
    ``data#dataset_dir``."""
    data = resolve_data_config(data)
    if source is None:
        return [{"image": c["image"], "case_id": c["case_id"]} for c in split_cases(data, "test")]
    return find_cases(source, data["task"])


def case_entries(data: Mapping, source: str | None, writer: CaseWriter, skip_existing: bool = False) -> list[dict]:
    """Cases to reconstruct: :func:`input_entries`, less those already in ``writer``'s folder, which are refused or
    skipped (see ``CaseWriter.pending``).

    Under ``torch.distributed`` (``multi_gpu_inference.yaml``) every rank calls it and gets its share: rank 0 lists
    the cases (before any rank writes one), rank ``r`` of ``K`` takes cases ``r, r + K, r + 2K, ...`` of that list, so
    each case is reconstructed whole by one rank (a rank may get none).
    """
    writer.lock()  # every rank of the run, before rank 0 looks at the folder

    def todo() -> list[dict]:
        entries = input_entries(data, source)
        keep = set(writer.pending([e["case_id"] for e in entries], skip_existing))
        return [e for e in entries if e["case_id"] in keep]

    rank, world = rank_and_world()
    return from_rank0(todo)[rank::world]


class CaseDataset(Dataset):
    """MONAI dataset of whole cases: item ``i`` is :func:`~.loading.load_case` of ``data[i]``.

    ``data`` holds case entries (``{"image": path}``, optional ``case_id`` and stated acquisition), as MONAI's
    ``Dataset`` takes them (so MONAI tools that set ``dataset#data`` work); ``settings`` is the bundle's ``data``
    section. With ``on_bad_file="skip"`` a case that cannot be loaded becomes ``{"case_id", "image", "error"}`` (the
    evaluator logs and counts it) instead of stopping the run.
    """

    def __init__(self, data: Sequence[Mapping], settings: Mapping, mode: str, on_bad_file: str = "raise") -> None:
        entries = [{**e, "case_id": e.get("case_id") or safe_stem(case_id_of(Path(e["image"])))} for e in data]
        super().__init__(entries)
        self.settings = resolve_data_config(settings)
        self.mode = InputMode.parse(mode)
        self.bad = BadFileLog(on_bad_file)

    def _transform(self, index: int) -> dict:
        entry = self.data[index]
        try:
            return load_case(entry, self.settings, self.mode, int(self.settings["img_size"]))
        except BadInputError as e:
            self.bad.handle(e)
            return {"case_id": entry["case_id"], "image": entry["image"], "error": str(e)}


def case_metrics(outputs: Mapping[str, torch.Tensor], label: torch.Tensor, data_range: float,
                 calibration: Calibration | None = None, noise_level: torch.Tensor | None = None,
                 gain: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> dict:
    """Quality and calibration of one case against its reference (all ``[1, X, Y, Z]``, physical units).

    ``psnr_db`` over the volume and ``ssim`` (mean over slices) with ``data_range``; ``rmse``; ``crps`` of the
    Gaussian ``N(mean, total)`` per pixel; coverage of its central 50/90/95% intervals; ``uce`` (variance vs squared
    error, 10 bins) and ``ause`` (total std vs absolute error, relative to the oracle); mean EU/AU/total. With a
    ``calibration``: ``coverage_<level>_calibrated`` (each level's interval widened by its fitted scale, per slice
    that of the slice's ``noise_level [Z]`` bin when the calibration has noise bins, and per pixel that of its
    intensity class and EU bin when it has them and ``gain``/``offset`` ``[Z]`` (physical = gain * model + offset)
    are given).
    """
    mean, total = outputs["mean"].float(), outputs["total"].float()
    slices = lambda x: x[0].permute(2, 0, 1)[:, None]  # noqa: E731  [Z, 1, X, Y]
    error = mean - label
    flat = lambda x: x.flatten()[:: max(1, x.numel() // _METRIC_PIXELS)]  # noqa: E731
    covered = gaussian_coverage(mean, total, label)
    return {
        "psnr_db": psnr(mean.flatten()[None, None, None], label.flatten()[None, None, None], data_range).item(),
        "ssim": ssim(slices(mean), slices(label), data_range).mean().item(),
        "rmse": error.pow(2).mean().sqrt().item(),
        "crps": gaussian_crps(mean, total, label).mean().item(),
        **{f"coverage_{round(level * 100)}": value for level, value in covered.items()},
        "uce": uce(flat(total), flat(error.pow(2))),
        "ause": ause(flat(total), flat(error.abs())),
        **{f"mean_{name}": outputs[name].double().mean().item() for name in ("eu", "au", "total")},
        **({} if calibration is None else {
            f"coverage_{round(level * 100)}_calibrated": gaussian_coverage(
                mean, total * calibration.scales_for(outputs, noise_level, gain, offset, level).float() ** 2, label,
                [level])[level]
            for level in LEVELS if str(level) in calibration.scales}),
    }


class VolumeEvaluator(Evaluator):
    """MONAI ``Evaluator`` that reconstructs one whole case per iteration.

    ``engine.state.output``: ``case_id``, ``volumes`` (``mean``/``eu``/``au``/``total`` MetaTensors ``[1, X, Y, Z]``
    in the source file's layout and geometry), ``metrics`` (with a reference, else ``None``), ``preview`` (middle
    slice of cond and label) and ``seconds``; for a skipped case only ``case_id`` and ``error``.
    ``engine.state.skipped`` lists ``(case_id, error)``.

    Args:
        device: where the network runs (the reconstructor's network must be there).
        val_data_loader: yields lists holding one loaded case (``DataLoader(batch_size=1, collate_fn=no_collation)``).
        reconstructor: the :class:`VolumeReconstructor`.
        data_range: physical range for PSNR/SSIM (CT: the HU window's width); ``None``: twice each case's mean gain
            (the model's [-1, 1] range in physical units).
        calibration: a fitted :class:`~hyper_dm.calibration.Calibration`: adds the ``total_std_calibrated`` volume
            and calibrated coverage metrics (the raw maps stay as they are).
        val_handlers: Ignite handlers, e.g. the checkpoint loader and the :class:`CaseWriter`.
        on_error: ``"raise"``, or ``"skip"``: a case that fails at any stage (reading, sampling, a reconstruction
            that is not finite) is logged, counted in ``state.skipped`` and the run goes on.
        postprocessing: applied to ``engine.state.output`` of each reconstructed case before the handlers see it
            (MONAI's ``IterationEvents.MODEL_COMPLETED``), e.g. :class:`hyper_dm.export.DetectionLayout`.
        write_cond: also put the network's input in ``volumes`` as ``cond`` (CT: the sparse-view FBP, HU; MRI: the
            zero-filled magnitude), resized to the case's in-plane grid as the mean is (bilinear up, area down).

    With a reference, ``engine.state.output["residuals"]`` holds the case's standardised residuals ``[Z, P]``,
    ``eu_samples`` the same pixels' EU in model units and ``noise_level`` the noise the network reads from each
    slice ``[Z]`` (see :class:`CalibrationFitter`);
    ``departure`` is each slice's :func:`~hyper_dm.calibration.input_departure` ``[Z]``, and with a calibration that
    records departures ``input_check`` holds :meth:`~hyper_dm.calibration.Calibration.input_check` (else ``None``).
    """

    def __init__(self, device: torch.device | str, val_data_loader: Iterable, reconstructor: VolumeReconstructor,
                 data_range: float | None = None, calibration: Calibration | None = None,
                 val_handlers: Sequence | None = None, on_error: str = "raise",
                 postprocessing: Callable | None = None, write_cond: bool = False) -> None:
        super().__init__(device=torch.device(device), val_data_loader=val_data_loader, val_handlers=val_handlers,
                         decollate=False, postprocessing=postprocessing)
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.reconstructor, self.data_range, self.calibration = reconstructor, data_range, calibration
        self.on_error, self.write_cond = on_error, bool(write_cond)
        self.add_event_handler(Events.STARTED, lambda engine: setattr(engine.state, "skipped", []))

    def _iteration(self, engine: VolumeEvaluator, batchdata: list[dict] | dict) -> dict:
        case = batchdata[0] if isinstance(batchdata, list) else batchdata
        if "error" in case:
            return self._skip(engine, case["case_id"], case["error"])
        try:
            return self._reconstruct(engine, case)
        except Exception as err:
            if self.on_error == "raise":
                raise
            return self._skip(engine, case["case_id"], f"{case.get('image', '')}: {type(err).__name__}: {err}")

    @staticmethod
    def _skip(engine: VolumeEvaluator, case_id: str, error: str) -> dict:
        engine.state.skipped.append((case_id, error))
        engine.state.output = {"case_id": case_id, "error": error}
        return engine.state.output

    def _reconstruct(self, engine: VolumeEvaluator, case: dict) -> dict:
        start = time.perf_counter()
        volume = case["volume"]
        case = scale_like_calibration(case, self.calibration)
        raw = self.reconstructor.reconstruct_case(case)
        for name, image in raw.items():
            if not torch.isfinite(image).all():
                raise BadInputError(case.get("image", case["case_id"]), f"the reconstructed {name} holds "
                                    f"{int((~torch.isfinite(image)).sum())} NaN/infinite values (input out of range?)")
        label = case.get("label")
        metrics = residuals = eu_samples = local_eu_samples = mean_samples = None
        if self.write_cond:  # [1, x, y, Z] -> [1, X, Y, Z]
            slices = resize_slices(case["cond"][0].permute(2, 0, 1)[:, None].float(), tuple(volume.shape[1:3]))
            raw["cond"] = slices[:, 0].permute(1, 2, 0)[None].contiguous()
        checks = apply_calibration(raw, case, self.reconstructor, self.calibration)
        noise, input_check = checks["noise_level"], checks["input_check"]
        if label is not None:
            data_range = self.data_range or float(2 * case["gain"].mean())
            metrics = {"case_id": case["case_id"], "n_slices": int(volume.shape[-1]),
                       **case_metrics(raw, label.float(), data_range, checks["calibration"], noise, case["gain"],
                                    case["offset"]),
                       **{k: v for k, v in (input_check or {}).items() if k not in ("flagged_slices", "alpha")}}
            residuals = standardised_residuals(raw["mean"], raw["total"], label.float(), float(case["gain"].mean()))
            eu_samples = slice_samples(eu_in_model_units(raw["eu"], case["gain"]))
            local_eu_samples = slice_samples(local_eu_contrast(raw["eu"]))  # the same pixels
            mean_samples = slice_samples(in_model_units(raw["mean"], case["gain"], case["offset"]))
        k = volume.shape[-1] // 2
        preview = {name: raw[name][0, ..., k].numpy() for name in ("mean", "eu", "au")}
        preview["cond"] = case["cond"][0, ..., k].numpy()
        if label is not None:
            preview["label"] = label[0, ..., k].numpy()
        seconds = time.perf_counter() - start
        logger.info("case %s: %d slices of %s in %.1f s (%.2f s/slice), peak RSS %.0f MiB", case["case_id"],
                    volume.shape[-1], tuple(volume.shape[1:3]), seconds, seconds / volume.shape[-1],
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        engine.state.output = {"case_id": case["case_id"], "metrics": metrics, "preview": preview, "seconds": seconds,
                               "residuals": residuals, "eu_samples": eu_samples,
                               "local_eu_samples": local_eu_samples, "mean_samples": mean_samples,
                               "noise_level": noise,
                               "departure": checks["departure"], "acceleration": checks["acceleration"],
                               "input_check": input_check,
                               "volumes": {name: to_source_layout(image, volume) for name, image in raw.items()}}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # runs `postprocessing` on engine.state.output
        return engine.state.output


def run_inference(evaluator: VolumeEvaluator, writer: CaseWriter | None = None) -> list[tuple[str, str]]:
    """Run ``evaluator`` over its cases (nothing to do is logged, not an error), log what was skipped and, with a
    ``writer``, record the run in ``<output_dir>/inference_summary.json`` (cases written, cases skipped with the
    reason, cases found already written and left by ``skip_existing``, seconds); returns the skipped
    ``(case_id, error)`` pairs.

    Under ``torch.distributed`` every rank runs its share (:func:`case_entries`) and then waits for the others; rank
    0 writes the summary of all ranks' cases and rebuilds ``metrics.csv`` from every case in the folder, and every
    rank returns the skipped pairs of all ranks.
    """
    rank, world = rank_and_world()
    n_cases = len(evaluator.data_loader)
    start = time.perf_counter()
    skipped: list[tuple[str, str]] = []
    if n_cases == 0:
        logger.warning("nothing to reconstruct%s: no cases left (all already written?)",
                       f" on rank {rank} of {world}" if world > 1 else "")
    else:
        evaluator.run()
        skipped = evaluator.state.skipped
    logger.info("inference finished%s: %d case(s) reconstructed, %d skipped", f" on rank {rank}" if world > 1 else "",
                n_cases - len(skipped), len(skipped))
    for case_id, error in skipped:
        logger.warning("skipped case %s: %s", case_id, error)
    names = {case_id for case_id, _ in skipped}
    done = [e["case_id"] for e in getattr(evaluator.data_loader.dataset, "data", []) if e["case_id"] not in names]
    parts = gather((done, skipped))  # every rank has finished its cases past this point
    done = [case_id for part, _ in parts for case_id in part]
    skipped = [pair for _, part in parts for pair in part]
    if writer is not None and rank == 0:
        writer.write_summary({"reconstructed": done, "skipped": [{"case_id": c, "error": e} for c, e in skipped],
                              "already_written": writer.already_written,
                              "seconds": round(time.perf_counter() - start, 1)})
        if world > 1 and any(writer.output_dir.glob("*/*_metrics.json")):
            writer.update_table()  # the ranks rebuilt it concurrently: each copy may miss another rank's last case
    return skipped


def calibration_dataset(data: Mapping, noise_levels: Sequence[float], on_bad_file: str = "raise",
                        fbp_pitches: Sequence[str] | None = None, accelerations: Sequence[int] | None = None,
                        splits: Sequence[str] = ("validation",), max_cases: int | None = None) -> ConcatDataset:
    """The validation split (or the cases of ``splits``, at most ``max_cases`` of them spread evenly over the list)
    simulated at each measurement noise level (CT: photon count ``i0``; MRI: k-space noise std ``kspace_noise``)
    and with each measurement: CT FBPs made at each of ``fbp_pitches``, MRI masks at each of ``accelerations``
    (with :func:`~hyper_dm.data.config.fastmri_center_fraction`; default: ``data#fbp_pitch`` / the data's masks
    alone), as :class:`CaseDataset` s one after the other; case ids get the level (and pitch or acceleration) as a
    suffix."""
    data = resolve_data_config(data)
    key = MEASUREMENT_NOISE[data["task"]][0]
    if not noise_levels:
        raise ValueError(f"inference_cfg#calibration_noise_levels: give at least one {key} value, got {noise_levels}")
    if data["task"] == "ct":
        measurements = {f"_{p}_pitch": {"fbp_pitch": p} for p in fbp_pitches or [data["fbp_pitch"]]}
    else:
        try:
            measurements = {f"_{a:g}x": {"accelerations": [a], "center_fractions": [fastmri_center_fraction(a)]}
                            for a in accelerations or []} or {"": {}}
        except (TypeError, ValueError) as e:
            raise ValueError(f"inference_cfg#calibration_accelerations: {e}") from e
    named = len(measurements) > 1  # one measurement: no suffix
    cases = split_cases(data, *splits)
    if max_cases is not None and len(cases) > max_cases:
        cases = [cases[i * len(cases) // max_cases] for i in range(max_cases)]
    if tuple(splits) == ("validation",) and len(cases) < FEW_CALIBRATION_CASES:
        logger.warning("calibrating on %d validation case(s) of %s: the scales, the EU threshold and the input check's "
                       "references then describe %s; list at least %d in the datalist's validation split",
                       len(cases), dataset_root(data), "one patient" if len(cases) == 1 else "few patients",
                       FEW_CALIBRATION_CASES)
    return ConcatDataset([
        CaseDataset([{"image": c["image"], "case_id": f"{c['case_id']}_{key}{level:g}{suffix if named else ''}"}
                     for c in cases],
                    resolve_data_config({**data, **overrides, key: level}), "simulate", on_bad_file)
        for suffix, overrides in measurements.items() for level in noise_levels])


def calibration_holdout(case_ids: Sequence[str], residuals: Sequence[torch.Tensor],
                        noise_levels: Sequence[torch.Tensor], eu: Sequence[torch.Tensor], bins: int = 1,
                        eu_bin_levels: Sequence[float] = (), level: float = 0.9, means: Sequence[torch.Tensor] = (),
                        intensity_edges: Sequence[float] = (), eu_level: bool = False
                        ) -> dict[str, list[tuple[float, float, float]]]:
    """:func:`~hyper_dm.calibration.holdout_coverage` of the cases of a calibrate run, named as
    :func:`calibration_dataset` names them (``<patient>_<i0|kspace_noise><level>[_<pitch or acceleration>]``),
    each MRI acceleration held out within itself (it has its own calibration): ``{measurement: [(coverage,
    coverage of the highest-EU tenth, of the tissue) per patient]}``; empty with fewer than two patients."""
    parts = []
    for case_id in case_ids:
        match = _CALIBRATION_ID.fullmatch(case_id)
        if match is None:
            raise ValueError(f"case id {case_id!r} is not <patient>_<i0|kspace_noise><level>[_<pitch>_pitch|_<a>x] "
                             "as calibration_dataset names its cases")
        parts.append((match["patient"], match["measurement"], match["acceleration"] or ""))
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for acceleration in dict.fromkeys(a for _, _, a in parts):
        cases = [i for i, (_, _, a) in enumerate(parts) if a == acceleration]
        if len({parts[i][0] for i in cases}) < 2:
            return {}
        pick = lambda x, cases=cases: [x[i] for i in cases] if x else ()  # noqa: E731
        covered = holdout_coverage(pick(residuals), pick(noise_levels), pick(eu), [parts[i][0] for i in cases], bins,
                                   eu_bin_levels, level, pick(means), intensity_edges, eu_level)
        for i, c in zip(cases, covered, strict=True):
            rows.setdefault(parts[i][1], []).append(c)
    return rows


def scale_ratio_cases(data: Mapping, noise_levels: Sequence[float], accelerations: Sequence[int] | None = None,
                      on_bad_file: str = "raise", max_files: int = RATIO_FILES) -> list[tuple[float, float]]:
    """MRI: ``(mask acceleration, magnitude scale over the zero-filled image's)`` of the files of the training and
    validation splits (at most ``max_files``) at each calibration noise level and acceleration, the cases
    :attr:`~hyper_dm.calibration.Calibration.scale_ratio` is the median of. The ratio is a property of the data and
    the masks, not of the model, so it is measured on more files than calibration reconstructs (loading only, about
    0.15 s a case on 2 CPU cores): one file's ratio lies up to 5% from the median of many. CT: ``[]``."""
    if resolve_data_config(data)["task"] != "mri":
        return []
    cases = calibration_dataset(data, noise_levels, on_bad_file, accelerations=accelerations,
                                splits=("training", "validation"), max_cases=max_files)
    return [(mask_acceleration(case), float(case["scale_ratio"].median())) for case in cases if "error" not in case]


_SAMPLES = ("case_ids", "residuals", "noise_levels", "eu", "local_eu", "means", "departures", "accelerations")
"""What a calibrate run keeps of each case in its ``samples`` file (one list entry per case), besides ``sampling``."""


class CalibrationFitter:
    """Ignite handler: collects each case's standardised residuals, per-slice noise levels and EU and, when the run
    completes, fits and saves the split-conformal :class:`~hyper_dm.calibration.Calibration` with ``bins`` noise bins to
    ``path`` (tied to ``checkpoint``'s digest); with two or more MRI ``accelerations`` also one per acceleration, each
    case counted with the one nearest its mask's; ``intensity_edges`` and ``eu_bin_levels``: intensity classes
    within each noise bin (model units) and EU bins within each class, ``eu_level``: each class's scales following
    the slices' EU level (:func:`~hyper_dm.calibration.fit_calibration`). ``sampling`` (``M``, ``N``, ``steps``,
    ``seed``) records how the cases were reconstructed, with how the weight
    sets' latents were drawn (``weight_draws``); ``scale_ratios``: MRI, :func:`scale_ratio_cases`; ``samples``: also
    save what was collected there (``torch.save`` of plain tensors and lists, with each case's id and the mean in
    model units; for refits and :func:`~hyper_dm.calibration.holdout_coverage`)."""

    def __init__(self, path: str, checkpoint: str | None = None, bins: int = 1,
                 accelerations: Sequence[int] | None = None, sampling: Mapping[str, int] | None = None,
                 scale_ratios: Sequence[tuple[float, float]] = (), eu_bin_levels: Sequence[float] = (),
                 samples: str | None = None, intensity_edges: Sequence[float] = (), eu_level: bool = False) -> None:
        self.path, self.checkpoint, self.bins, self.samples = path, checkpoint, int(bins), samples
        self.eu_level = bool(eu_level)
        self.eu_bin_levels = [float(q) for q in eu_bin_levels or ()]
        self.intensity_edges = [float(e) for e in intensity_edges or ()]
        if not intensity_classes_valid(self.intensity_edges):  # before the run, not after hours of it
            raise ValueError(f"inference_cfg#calibration_intensity_edges {self.intensity_edges} must be ascending "
                             "values of the mean in the model's range (-1, 1), e.g. [-0.9] for -900 HU")
        self.sampling: dict[str, int | str] = {key: int(value) for key, value in (sampling or {}).items()}
        self.scale_ratios = list(scale_ratios)
        self.groups = list(accelerations or [])
        self.residuals: list[torch.Tensor] = []
        self.noise_levels: list[torch.Tensor] = []
        self.departures: list[torch.Tensor] = []
        self.eu: list[torch.Tensor] = []
        self.local_eu: list[torch.Tensor] = []
        self.means: list[torch.Tensor] = []
        self.accelerations: list[float] = []
        self.case_ids: list[str] = []

    def attach(self, engine: Evaluator) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.fit)

    def collect(self, engine: Evaluator) -> None:
        residuals = engine.state.output.get("residuals")
        if residuals is not None:
            self.residuals.append(residuals)
            self.noise_levels.append(engine.state.output["noise_level"])
            self.departures.append(engine.state.output["departure"])
            self.eu.append(engine.state.output["eu_samples"])
            self.local_eu.append(engine.state.output["local_eu_samples"])
            self.means.append(engine.state.output["mean_samples"])
            self.accelerations.append(engine.state.output["acceleration"])
            self.case_ids.append(engine.state.output["case_id"])
            self.sampling["weight_draws"] = engine.reconstructor.weight_draws  # attach runs before it is set

    def refit(self, samples_files: Sequence[str], weight_draws: str) -> Calibration:
        """Fit from calibrate runs' ``samples`` files (run id ``recalibrate``) instead of reconstructing: the
        calibration one run over all their cases would fit, with this fitter's settings. The files must hold
        disjoint cases reconstructed with the same weight sets; a file from before metadata 0.17.0 records none, and
        counts as made with this configuration's (``sampling`` and ``weight_draws``)."""
        if isinstance(samples_files, str) or not samples_files:
            raise ValueError(f"inference_cfg#calibration_from_samples must list calibrate runs' samples files "
                             f"(inference_cfg#calibration_samples), got {samples_files!r}")
        made_with = {}
        for path in samples_files:
            try:
                samples = torch.load(path, weights_only=True)
                sampling = samples.pop("sampling", {**self.sampling, "weight_draws": weight_draws})
                collected = {name: samples[name] for name in _SAMPLES}
            except (OSError, RuntimeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}: not a calibrate run's samples file (inference_cfg#calibration_samples): "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
            if made_with and sampling != next(iter(made_with.values())):
                first = next(iter(made_with))
                raise ValueError(f"{path} was reconstructed with {sampling}, {first} with {made_with[first]}: a "
                                 "calibration holds for one way of sampling weight sets")
            made_with[path] = sampling
            for name, values in collected.items():
                getattr(self, name).extend(values)
        again = sorted({c for c in self.case_ids if self.case_ids.count(c) > 1})
        if again:
            raise ValueError(f"case(s) {again[:3]} appear more than once in {list(samples_files)}: join each case once")
        self.sampling = dict(next(iter(made_with.values())))
        return self.fit()

    def fit(self, engine: Evaluator | None = None) -> Calibration:
        if self.samples:
            with atomic_write(self.samples) as tmp:
                torch.save({**{name: getattr(self, name) for name in _SAMPLES}, "sampling": self.sampling}, tmp)
        digest = sha256_file(self.checkpoint) if self.checkpoint and Path(self.checkpoint).is_file() else ""
        calibration = fit_calibration(self.residuals, self.noise_levels, self.bins, checkpoint_sha256=digest,
                                      departures=self.departures, accelerations=self.accelerations,
                                      acceleration_groups=self.groups, eu=self.eu, sampling=self.sampling,
                                      scale_ratios=self.scale_ratios, eu_bin_levels=self.eu_bin_levels,
                                      local_eu=self.local_eu, means=self.means,
                                      intensity_edges=self.intensity_edges, eu_level=self.eu_level)
        calibration.save(self.path)
        logger.info("calibration from %d cases (%d pixels): std scales %s, raw coverage %s -> %s", calibration.n_cases,
                    calibration.n_pixels, {k: round(v, 3) for k, v in calibration.scales.items()},
                    {k: round(v, 3) for k, v in calibration.raw_coverage.items()}, self.path)
        logger.info("calibration: %s", calibration.describe())
        per_bin = lambda thresholds: (f" (per noise bin: {', '.join(f'{t:.3g}' for t in thresholds)})"  # noqa: E731
                                      if thresholds else "")
        for group in calibration.groups:
            logger.info("unfamiliar pixels%s: EU above %.3g model units%s, or the mean EU over a box %g of the "
                        "slice's side above %.3g times the slice's %g EU quantile%s (each the %g quantile of the "
                        "calibration pixels)",
                        "" if group.acceleration is None else f" at {group.acceleration:g}x", group.eu_threshold,
                        per_bin(group.noise_eu_thresholds), group.local_eu_window, group.local_eu_threshold,
                        LOCAL_EU_REFERENCE, per_bin(group.noise_local_eu_thresholds), group.eu_level)
        held_out = [c for row in calibration_holdout(self.case_ids, self.residuals, self.noise_levels, self.eu,
                                                     self.bins, self.eu_bin_levels, means=self.means,
                                                     intensity_edges=self.intensity_edges,
                                                     eu_level=self.eu_level).values()
                    for c in row]
        if held_out:
            span = lambda k: f"{min(c[k] for c in held_out):.3f}-{max(c[k] for c in held_out):.3f}"  # noqa: E731
            logger.info("calibration held out one validation patient at a time (scripts/calibration_holdout.py): "
                        "90%% coverage %s over patients and measurements, %s of their highest-EU tenth%s", span(0),
                        span(1), f", {span(2)} of their tissue" if self.means else "")
        return calibration

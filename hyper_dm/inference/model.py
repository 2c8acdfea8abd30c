"""One call from Python: a model loaded from the bundle reconstructs a volume the user has.

Example::

    >>> model = HyperDM.from_bundle("bundle/models/model.pt", config="bundle/configs/ct_luna16.yaml")
    >>> out = model.reconstruct("patient7.nii.gz", M=8, N=8)                  # a file, DICOM folder or .h5
    >>> out["mean"].shape, out["eu"].affine                                     # [1, X, Y, Z] HU, source geometry
    >>> out["total_std_calibrated"], out["unfamiliar"], out["input_check"]      # with calibration.json beside model.pt
    >>> out = model.reconstruct(fbp_volume, M=8, N=8)                          # MetaTensor [1, X, Y, Z] HU (measured)

The same loader, reconstructor and metrics run in ``python -m monai.bundle run inference``, the scripts and the
MONAI Label app.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from ..calibration import Calibration
from ..config import config_files_for
from ..data.config import resolve_data_config
from ..data.intensity import physical_map
from ..data.validation import BadInputError
from ..engines.checkpoint import read_checkpoint
from ..io import safe_stem
from ..networks.hypernet import WEIGHT_DRAWS
from .calibrated import apply_calibration, load_calibration, scale_like_calibration
from .inputs import case_id_of
from .loading import InputMode, load_case, to_source_layout, zero_filled_scales
from .reconstructor import VolumeReconstructor

__all__ = ["HyperDM", "load_hypernet_state"]


def load_hypernet_state(path: str | Path, map_location: str | torch.device = "cpu",
                        config: Mapping | None = None) -> dict[str, torch.Tensor]:
    """HyperNetwork weights from ``model.pt`` or a training checkpoint (``weights_only=True``).

    Every failure names the file; with ``config`` (the bundle's ``checkpoint_config``) a checkpoint written for
    another config is an error naming the key and both values (:func:`~hyper_dm.engines.read_checkpoint`).
    """
    state = read_checkpoint(path, map_location, config)
    if isinstance(state, Mapping) and "hypernet" in state:
        state = state["hypernet"]
    if not isinstance(state, Mapping):
        raise BadInputError(path, "holds no HyperNetwork state dict (expected the 'hypernet' entry)")
    return dict(state)


class HyperDM:
    """A trained Hyper-DM model with its bundle settings: ``reconstruct`` is the whole method in one call.

    Build it with :meth:`from_bundle`; ``parser`` is the resolved bundle config (``data``, ``diffusion``, ...);
    ``calibration`` (a fitted :class:`~hyper_dm.calibration.Calibration` or ``None``) calibrates every
    reconstruction and checks its input, as the bundle's inference does.
    """

    def __init__(self, parser: ConfigParser, calibration: Calibration | None = None) -> None:
        self.parser = parser
        self.data = resolve_data_config(parser.get_parsed_content("data"))
        self.network = parser.get_parsed_content("network")
        self.calibration = calibration

    @classmethod
    def from_bundle(cls, ckpt: str | Path, config: str | None = None, device: str | torch.device | None = None,
                    calibration: str | Path | None = None, **overrides: Any) -> HyperDM:
        """Load ``ckpt`` into the network the bundle configs define (``common.yaml`` + ``inference.yaml`` + the
        overlay ``config``; ``overrides`` as bundle ids, e.g. ``{"diffusion#ddim_steps": 10}``). A checkpoint
        whose config record differs from these configs' ``checkpoint_config`` is an error naming the key.
        ``calibration``: the calibration JSON (default: ``calibration.json`` beside ``ckpt``, used if present)."""
        parser = ConfigParser()
        parser.read_config(config_files_for("infer", config))
        parser.update(overrides)
        if device is not None:
            parser["device"] = f"$torch.device('{torch.device(device)}')"
        if calibration is not None and not Path(calibration).is_file():
            raise BadInputError(calibration, "does not exist: give a calibration JSON written by the 'calibrate' "
                                             "run id, or none to use calibration.json beside the checkpoint")
        model = cls(parser, load_calibration(calibration or Path(ckpt).with_name("calibration.json"), ckpt))
        record = parser.get_parsed_content("checkpoint_config")
        model.network.load_state_dict(load_hypernet_state(ckpt, next(model.network.parameters()).device, record))
        return model

    def reconstructor(self, M: int, N: int, steps: int | None = None, seed: int = 0,
                      weight_draws: str = WEIGHT_DRAWS) -> VolumeReconstructor:
        """A :class:`VolumeReconstructor` over this model's network with the bundle's sampler settings (``steps``
        overrides ``ddim_steps``; ``weight_draws``: how its latents are drawn); only the sampler is built anew."""
        self.parser["reconstructor#sampler#steps"] = "@diffusion#ddim_steps" if steps is None else int(steps)
        self.parser.parse(reset=True)
        sampler = self.parser.get_parsed_content("reconstructor#sampler", instantiate=True)
        settings = self.parser.get_parsed_content("inference_cfg")
        return VolumeReconstructor(self.network, sampler, img_size=int(self.data["img_size"]), m_weights=int(M),
                                   n_draws=int(N), slice_batch=int(settings["slice_batch"]), seed=int(seed),
                                   weight_draws=weight_draws)

    def reconstruct(self, volume: str | Path | MetaTensor, M: int = 4, N: int = 4, steps: int | None = None,
                    mode: str = "measured", seed: int = 0) -> dict[str, Any]:
        """Reconstruct a volume; returns ``mean``, ``eu``, ``au``, ``total`` ``[1, X, Y, Z]`` MetaTensors in
        physical units (variances squared) with the input's geometry and voxel layout. With a calibration, also
        ``total_std_calibrated`` (physical units), ``unfamiliar`` (1 where EU, or its local contrast, exceeds the
        calibration's threshold, where it records one) and ``input_check`` (a dict, see
        :meth:`~hyper_dm.calibration.Calibration.input_check`; ``None`` without calibration departures); a warning
        is logged when the input fails the check or its noise lies outside the calibrated range.

        ``volume``: a file or DICOM folder (read as the bundle's inference reads it, ``mode`` ``measured`` or
        ``simulate``), or a MetaTensor ``[X, Y, Z]`` / ``[1, X, Y, Z]`` already in the model's slice layout holding
        the condition in physical units (HU for CT, magnitude for MRI). An MRI mean is made consistent with the
        measured k-space only when it comes from a file (a magnitude tensor carries no k-space).
        """
        if isinstance(volume, (str, Path)):
            entry = {"image": str(Path(volume).resolve()), "case_id": safe_stem(case_id_of(Path(volume)))}
            case = load_case(entry, self.data, InputMode.parse(mode), int(self.data["img_size"]))
        else:
            case = self._case_from_tensor(volume)
        case = scale_like_calibration(case, self.calibration)
        reconstructor = self.reconstructor(M, N, steps, seed)
        raw = reconstructor.reconstruct_case(case)
        input_check = apply_calibration(raw, case, reconstructor, self.calibration)["input_check"]
        return {**{name: to_source_layout(image, case["volume"]) for name, image in raw.items()},
                "input_check": input_check}

    def _case_from_tensor(self, volume: torch.Tensor) -> dict:
        volume = volume if isinstance(volume, MetaTensor) else MetaTensor(volume)
        volume = volume[None] if volume.ndim == 3 else volume
        if volume.ndim != 4 or volume.shape[0] != 1:
            raise ValueError(f"volume must be [X, Y, Z] or [1, X, Y, Z], got shape {tuple(volume.shape)}")
        z = volume.shape[-1]
        if self.data["task"] == "ct":
            gain, offset = physical_map("ct", self.data["hu_window"])
            cond = volume.as_tensor().float().clamp(*self.data["hu_window"])
            return {"volume": volume, "cond": cond, "gain": torch.full((z,), gain), "offset": torch.full((z,), offset)}
        cond = volume.as_tensor().float()
        scales = zero_filled_scales(cond[0].permute(2, 0, 1).numpy(), self.data["mri_norm"])
        gains = torch.tensor([physical_map("mri", self.data["hu_window"], float(s)) for s in scales])
        return {"volume": volume, "cond": cond, "gain": gains[:, 0].float(), "offset": gains[:, 1].float(),
                "scale_ratio": None}  # the scale of the condition alone

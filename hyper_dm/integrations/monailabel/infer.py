"""MONAI Label infer tasks: one per output map, ``hyperdm_mean``, ``hyperdm_eu``, ``hyperdm_au``, ``hyperdm_total``,
``hyperdm_total_std_calibrated`` when the model has a calibration (``calibration.json`` beside the checkpoint) and
``hyperdm_unfamiliar`` when that calibration records an EU threshold.

MONAI Label answers an infer request with one image file and a JSON ``params``; each map is therefore its own
model name. All four come from the same M x N reconstruction, which the service keeps, so asking for the mean,
then the EU and AU maps of the same study with the same parameters costs one reconstruction.

Request: ``POST /infer/hyperdm_eu?image=<study id>`` (or an uploaded ``file``), form field
``params={"M": 4, "N": 4, "steps": 10}`` (any left out take the server's defaults, shown by ``GET /info/``).
Reply: a float32 NIfTI on the study's own grid and geometry (``mean``: HU for CT, magnitude for MRI; ``eu``,
``au``, ``total``: variances in those units squared; ``total_std_calibrated``: a standard deviation in those units,
scaled so that mean +- 1.645 x it covers 90% on the calibration data; ``unfamiliar``: a uint8 label map, 1 where
EU, or its local contrast, exceeds the calibration's 99.9% quantile) and ``params``::

    {"map": "eu", "units": "HU^2", "M": 4, "N": 4, "steps": 10, "cached": false, "seconds": 3.1,
     "summary": {"mean_eu_body": ..., "mean_au_body": ..., "max_eu": ..., "body_fraction": ...},
     "input_check": {"input_unlike_calibration": false, "input_departure_p": 0.41, ...},
     "maps": {"mean": "hyperdm_mean", "eu": "hyperdm_eu", ...}}

``input_check`` is :meth:`hyper_dm.calibration.Calibration.input_check` of the study (``null`` without a calibration
that records departures): when ``input_unlike_calibration`` is true the maps likely understate the error.

Refusals are HTTP errors whose ``detail`` says what to change (422 bad parameters or file, 429 busy).
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from ...engines.writer import save_map
from .conf import RequestError
from .service import CALIBRATED, MODEL_NAMES, UNFAMILIAR, ReconstructionService
from .summary import uncertainty_summary

__all__ = ["CALIBRATED", "MODEL_NAMES", "UNFAMILIAR", "HyperDMInferTask", "http_error"]

logger = logging.getLogger("hyper_dm.monailabel")

_MEANING = {"mean": "posterior mean reconstruction", "eu": "epistemic variance (weight sets disagree)",
            "au": "aleatoric variance (the measurement does not determine it)", "total": "total variance eu + au",
            CALIBRATED: "calibrated total standard deviation (90% intervals: mean +- 1.645 x it)",
            UNFAMILIAR: "unfamiliar pixels: 1 where EU or its local contrast exceeds the calibration's 99.9% quantile"}


def http_error(error: RequestError) -> HTTPException:
    """The HTTP reply of a refused request."""
    return HTTPException(status_code=error.status, detail=error.detail, headers=error.headers or None)


class HyperDMInferTask(InferTask):
    """Returns the ``output`` map (one of ``mean``, ``eu``, ``au``, ``total``) of a study, reconstructed by
    ``service`` with the request's M, N and steps."""

    def __init__(self, service: ReconstructionService, output: str) -> None:
        conf = service.conf
        units = "HU" if service.task == "ct" else "magnitude"
        self.units = {"mean": units, CALIBRATED: units, UNFAMILIAR: "label"}.get(output, f"{units}^2")
        mask = output == UNFAMILIAR
        super().__init__(
            type=InferType.SEGMENTATION if mask else InferType.OTHERS,
            labels={"unfamiliar": 1} if mask else None,
            dimension=3,
            description=f"Hyper-DM {_MEANING[output]} ({self.units}); "
                        f"M <= {conf.max_M}, N <= {conf.max_N}, steps <= {conf.max_steps}",
            config={"M": conf.M, "N": conf.N, "steps": conf.steps or service.default_steps},
        )
        self.service, self.output = service, output

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        start = time.perf_counter()
        try:
            sampling = self.service.conf.sampling(request, self.service.default_steps)
            out, cached = self.service.reconstruct(request["image"], sampling, name=request.get("image_id"))
        except RequestError as e:
            raise http_error(e) from None
        path = tempfile.NamedTemporaryFile(prefix=f"hyperdm_{self.output}_", suffix=".nii.gz", delete=False).name
        save_map(path, out[self.output], self.output)  # MONAI Label sends it, then removes it
        params = {"map": self.output, "units": self.units, "M": sampling.M, "N": sampling.N,
                  "steps": sampling.steps, "cached": cached, "seconds": round(time.perf_counter() - start, 3),
                  "summary": uncertainty_summary(out, self.service.task), "input_check": out["input_check"],
                  "maps": self.service.model_names}
        logger.info("%s of %s: M=%d N=%d steps=%d in %.1f s%s", MODEL_NAMES[self.output], request.get("image_id"),
                    sampling.M, sampling.N, sampling.steps, params["seconds"], " (kept result)" if cached else "")
        return path, params

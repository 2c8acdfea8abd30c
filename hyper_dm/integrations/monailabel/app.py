"""The MONAI Label app: Hyper-DM reconstructions with uncertainty maps, and studies ranked by epistemic uncertainty.

Models (infer tasks): ``hyperdm_mean``, ``hyperdm_eu``, ``hyperdm_au``, ``hyperdm_total``, and
``hyperdm_total_std_calibrated`` where the model has a calibration and ``hyperdm_unfamiliar`` where it records an EU
threshold (see infer.py).
Scoring method ``hyperdm_eu`` and strategy ``hyperdm_eu`` (see scoring.py); MONAI Label's ``random`` and ``first``
strategies stay available. Settings come from ``--conf`` (see conf.py). Started by ``hyper-dm-label`` or by
``monailabel start_server --app <app folder>`` (docs/monailabel.md).

What the app adds to MONAI Label's request handling: an image id that is not a study is a 404 naming the id, an
image path on the server that is neither a study nor an upload is refused (403), and the app will not start on an
address other machines reach unless ``--conf expose true`` (safety.py).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import Any

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.activelearning.epistemic import Epistemic
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from .conf import LabelConf, RequestError
from .infer import CALIBRATED, MODEL_NAMES, UNFAMILIAR, HyperDMInferTask, http_error
from .safety import check_bind, server_host
from .scoring import SCORE_KEY, EpistemicScoring
from .service import ReconstructionService, lock_path

__all__ = ["HyperDMApp"]

logger = logging.getLogger("hyper_dm.monailabel")


class HyperDMApp(MONAILabelApp):
    """MONAI Label app serving one Hyper-DM checkpoint (``conf``: MONAI Label's ``--conf`` pairs)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.settings = LabelConf.parse(conf)
        check_bind(server_host(sys.argv[1:]), self.settings.expose)
        self.service = ReconstructionService(self.settings, lock_path(studies))
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="Hyper-DM",
                         description="Hyper-DM reconstruction with epistemic (EU) and aleatoric (AU) variance maps",
                         version="0.1.0")
        self._auto_update_scoring = self._auto_update_scoring and self.settings.auto_score

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")) or self.service.task == "ct":
            return super().init_datastore()
        return LocalDatastore(self.studies, extensions=["*.h5"],  # knee studies: fastMRI / challenge .h5 files
                              auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                              read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def init_infers(self) -> dict[str, HyperDMInferTask]:
        """The maps ``--conf models`` names: ``hyperdm`` (default) for all, or a comma list such as
        ``hyperdm_mean,hyperdm_eu``."""
        served = self.service.model_names
        wanted = str(self.conf.get("models", "hyperdm"))
        names = list(served.values()) if wanted in ("hyperdm", "all") else wanted.split(",")
        unknown = sorted(set(names) - set(served.values()))
        if unknown:
            missing = " (needs calibration.json beside the checkpoint, or --conf calibration)" \
                if MODEL_NAMES[CALIBRATED] in unknown else " (needs a calibration that records an EU threshold: " \
                "refit it with the 'calibrate' run id)" if MODEL_NAMES[UNFAMILIAR] in unknown else ""
            raise ValueError(f"--conf models {wanted!r}: unknown {unknown}{missing}; use hyperdm (all maps) or a "
                             f"comma list of {list(served.values())}")
        return {model: HyperDMInferTask(self.service, output) for output, model in served.items() if model in names}

    def init_scoring_methods(self) -> dict[str, EpistemicScoring]:
        return {SCORE_KEY: EpistemicScoring(self.service)}

    def init_strategies(self) -> dict[str, Any]:
        return {SCORE_KEY: Epistemic(key=SCORE_KEY, desc="Study with the highest mean EU over the body first"),
                "random": Random(), "first": First()}

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's infer, after checking what ``image`` names (a study id or an uploaded file)."""
        if request.get("model") not in self._infers:
            raise HTTPException(404, f"no model {request.get('model')!r}; this server has {sorted(self._infers)}")
        image = request.get("image")
        if not isinstance(image, str):
            raise HTTPException(422, "image must be a study id or an uploaded file")
        store = datastore or self.datastore()
        if image in store.list_images():
            request = {**request, "image_id": image}
        elif os.path.isabs(image) and os.path.exists(image):
            if os.path.dirname(os.path.realpath(image)) != os.path.realpath(tempfile.gettempdir()):
                raise HTTPException(403, "image paths on the server are not accepted: give a study id or upload "
                                         "the volume as the request's file")
            request = {**request, "image_id": "the uploaded file"}
        else:
            raise HTTPException(404, f"no study {image!r} in this server's studies; GET /datastore/?output=all "
                                     "lists them, or upload the volume as the request's file")
        return super().infer(request, datastore)

    def scoring(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        try:
            return super().scoring(request, datastore)
        except RequestError as e:
            raise http_error(e) from None

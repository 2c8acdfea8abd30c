"""Active learning by epistemic uncertainty: score each study by its mean EU over the body.

:class:`EpistemicScoring` (MONAI Label scoring method ``hyperdm_eu``) reconstructs every study without a final
label and stores in the datastore's image info::

    hyperdm_eu       mean epistemic variance over the body (units^2, see summary.py): the score
    hyperdm_scoring  {"ckpt_sha256", "M", "N", "steps", "mean_au_body", "seconds"} or {"error": ...}

A study already scored with the same checkpoint and parameters is skipped, so rescoring after new studies arrive
costs only the new ones. MONAI Label's own ``Epistemic`` strategy with ``key="hyperdm_eu"`` (strategy name
``hyperdm_eu``) then serves the study with the highest score first, the model's least familiar one, and moves a
served study to the back for a day.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from ...io import sha256_file
from .conf import RequestError, Sampling
from .service import ReconstructionService
from .summary import uncertainty_summary

__all__ = ["SCORE_KEY", "EpistemicScoring"]

logger = logging.getLogger("hyper_dm.monailabel")

SCORE_KEY = "hyperdm_eu"
"""Image-info key of the score (MONAI Label's ``Epistemic(key=SCORE_KEY)`` ranks by it)."""
INFO_KEY = "hyperdm_scoring"


class EpistemicScoring(ScoringMethod):
    """Stores each unlabelled study's mean EU over the body, computed by ``service`` with the server's default
    M, N and steps (request params ``M``/``N``/``steps`` override them within the limits)."""

    def __init__(self, service: ReconstructionService) -> None:
        super().__init__("Hyper-DM: mean epistemic variance over the body of each unlabelled study")
        self.service = service
        self.ckpt_sha256 = sha256_file(service.conf.ckpt)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        start = time.perf_counter()
        sampling = self.service.conf.sampling(request, self.service.default_steps)
        done = {"ckpt_sha256": self.ckpt_sha256, "M": sampling.M, "N": sampling.N, "steps": sampling.steps}
        scores, skipped, failed = {}, 0, {}
        for image_id in datastore.get_unlabeled_images():
            info = datastore.get_image_info(image_id)
            previous = info.get(INFO_KEY, {})
            if SCORE_KEY in info and {k: previous.get(k) for k in done} == done:
                skipped += 1
                continue
            try:
                scores[image_id] = self._score(image_id, datastore, sampling, done)
            except RequestError as e:  # a bad study is recorded, not fatal for the others
                failed[image_id] = e.detail
                datastore.update_image_info(image_id, {INFO_KEY: {**done, "error": e.detail}})
                logger.warning("hyperdm_eu scoring: %s", e.detail)
        summary = {"scored": scores, "skipped": skipped, "failed": failed,
                   "seconds": round(time.perf_counter() - start, 2)}
        logger.info("hyperdm_eu scoring: %d scored, %d kept, %d failed in %.1f s", len(scores), skipped, len(failed),
                    summary["seconds"])
        return summary

    def _score(self, image_id: str, datastore: Datastore, sampling: Sampling, done: dict) -> float:
        begin = time.perf_counter()
        out, _ = self.service.reconstruct(datastore.get_image_uri(image_id), sampling, wait=True, name=image_id)
        summary = uncertainty_summary(out, self.service.task)
        datastore.update_image_info(image_id, {
            SCORE_KEY: summary["mean_eu_body"],
            INFO_KEY: {**done, "mean_au_body": summary["mean_au_body"],
                       "seconds": round(time.perf_counter() - begin, 2)},
        })
        logger.info("hyperdm_eu scoring: %s mean EU over the body %.4g", image_id, summary["mean_eu_body"])
        return summary["mean_eu_body"]

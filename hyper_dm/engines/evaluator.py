"""Ignite evaluator: M x N DDIM reconstruction with uncertainty for each batch of conditions."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import torch
from ignite.metrics import Metric
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents

from ..diffusion.inferer import HyperDiffusionInferer
from ..networks.hypernet import HyperNetwork
from ..uncertainty import crps
from .distributed import rank_and_world, unwrap

__all__ = ["HyperDiffusionEvaluator"]


class HyperDiffusionEvaluator(Evaluator):
    """MONAI ``Evaluator`` running a :class:`HyperDiffusionInferer` on ``batch["cond"]``.

    ``engine.state.output`` (decollated per slice by MONAI) holds ``pred`` (posterior mean), ``eu``, ``au``
    and ``total`` (variances), all ``[C, H, W]`` in the model's normalised range, the ``cond`` input, and,
    when the batch has a ``target``, ``label`` and the per-slice mean ``crps`` (when the inferer keeps its
    samples). Metric handlers read them with ``monai.handlers.from_engine``.

    The inferer gets the batch's 1-based index in this run (``state.iteration``, reset by every ``run``): a batch
    starts from fresh diffusion noise, and each validation run draws the same. Under ``torch.distributed`` (each rank
    validating its share, ``multi_gpu_train.yaml``) the index counts the batches of all ranks,
    ``(iteration - 1) * world_size + rank + 1``, so no two ranks draw the same noise.

    ``state_dict()``/``load_state_dict()`` hold what outlives one ``run``: the best key metric ``best_metric`` and
    its epoch ``best_metric_epoch`` (MONAI's ``state`` fields); put the evaluator in the training checkpoint and a
    resumed run compares its validations with the best of the whole run. (Its counters are set by each ``run``.)

    ``network`` may be the DDP wrapper the trainer uses: the evaluator samples with the HyperNetwork inside it.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: Iterable,
        network: HyperNetwork,
        inferer: HyperDiffusionInferer,
        epoch_length: int | None = None,
        key_val_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        val_handlers: Sequence | None = None,
        amp: bool = False,
    ) -> None:
        device = torch.device(device)
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            epoch_length=epoch_length,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            val_handlers=val_handlers,
            amp=bool(amp) and device.type == "cuda",
        )
        self.network, self.inferer = network, inferer

    def state_dict(self) -> OrderedDict:
        return OrderedDict(best_metric=self.state.best_metric, best_metric_epoch=self.state.best_metric_epoch)

    def load_state_dict(self, state_dict: Mapping) -> None:
        self.state.best_metric = state_dict["best_metric"]
        self.state.best_metric_epoch = state_dict["best_metric_epoch"]

    def _iteration(self, engine: HyperDiffusionEvaluator, batchdata: dict) -> list[dict] | dict:
        if "cond" not in batchdata:
            raise KeyError(f"evaluation batch has no 'cond' entry (keys: {sorted(batchdata)})")
        cond = batchdata["cond"].to(engine.state.device)
        label = batchdata.get("target")
        channels = None if label is None else label.shape[1]
        network = unwrap(engine.network)
        network.eval()
        with torch.autocast("cuda", enabled=engine.amp):
            rank, world = rank_and_world()
            batch_index = (engine.state.iteration - 1) * world + rank + 1
            result = engine.inferer(cond, network, channels=channels, batch_index=batch_index)
        stats = result.stats
        output = {"pred": stats.mean, "eu": stats.eu, "au": stats.au, "total": stats.total, "cond": cond}
        if label is not None:
            output["label"] = label.to(engine.state.device)
            if result.samples is not None:
                samples = result.samples.flatten(0, 1).to(engine.state.device)  # [M*N, B, C, H, W]
                output["crps"] = crps(samples, output["label"]).flatten(1).mean(dim=1)  # [B]
        engine.state.output = output
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI decollates state.output here
        return engine.state.output

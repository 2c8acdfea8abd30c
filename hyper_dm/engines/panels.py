"""TensorBoard image panel of one validation slice: cond | mean | EU | AU | |error| | target."""

from __future__ import annotations

from collections.abc import Callable

import torch
from ignite.engine import Engine, Events
from torch.utils.tensorboard import SummaryWriter

__all__ = ["UncertaintyPanelHandler", "panel_image"]


def panel_image(item: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[1, H, k*W]`` image in [0, 1] from one decollated evaluator output (first channel of each map).

    Images (cond, mean, target) map the model range [-1, 1] to [0, 1]; EU, AU and |error| are each scaled
    by their own maximum, so the panel shows where, not how much (TensorBoard scalars give the amounts).
    """
    image = lambda x: ((x[0] + 1) / 2).clamp(0, 1)  # noqa: E731
    relative = lambda x: x[0] / x[0].max().clamp_min(1e-12)  # noqa: E731
    tiles = [image(item["cond"]), image(item["pred"]), relative(item["eu"]), relative(item["au"])]
    if "label" in item:
        tiles += [relative((item["pred"] - item["label"]).abs()), image(item["label"])]
    return torch.cat([t.float().cpu() for t in tiles], dim=1).unsqueeze(0)


class UncertaintyPanelHandler:
    """Writes :func:`panel_image` of the first slice of each evaluator run to TensorBoard.

    Args:
        summary_writer: the run's TensorBoard writer (shared with the stats handlers; its owner closes it).
        global_step_transform: maps the evaluator's epoch to the step shown (e.g. the trainer's epoch).
        tag: TensorBoard image tag.
    """

    def __init__(
        self, summary_writer: SummaryWriter, global_step_transform: Callable[[int], int] = lambda epoch: epoch,
        tag: str = "validation/cond_mean_eu_au_error_target",
    ) -> None:
        self.writer = summary_writer
        self.global_step_transform, self.tag = global_step_transform, tag

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.writer.flush())

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        item = output[0] if isinstance(output, list) else {k: v[0] for k, v in output.items()}
        self.writer.add_image(self.tag, panel_image(item), self.global_step_transform(engine.state.epoch))

"""Ignite trainer whose iteration runs the Hyper-DM objective of ``training.mode``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from monai.inferers import DiffusionInferer
from torch import nn

from ..config import ConfigError
from ..diffusion.losses import LossConfig, training_loss
from ..diffusion.probes import PROBES, random_columns, random_objects
from ..networks.ensemble import DeepEnsemble
from ..networks.hypernet import HyperNetwork
from .distributed import rank_and_world, unwrap

__all__ = ["GradScalerState", "HyperDiffusionTrainer", "refuse_ensemble"]


def refuse_ensemble(network: nn.Module) -> None:
    """A :class:`~hyper_dm.networks.DeepEnsemble` (or its DDP wrapper) is an error: its members are trained apart.
    Training's first step (``train.yaml``), before the output folder is claimed, and the trainer's."""
    if isinstance(unwrap(network), DeepEnsemble):
        raise ConfigError("model#ensemble_members > 1 describes a deep-ensemble checkpoint, which is not trained as "
                          "one: train each member with ensemble_members 1 and its own training_cfg#seed, then "
                          "combine them with scripts/ensemble.py")


class HyperDiffusionTrainer(Trainer):
    """MONAI ``Trainer`` for a HyperNetwork over a frozen backbone.

    Each iteration takes ``batch["target"] [B, C, H, W]`` and ``batch["cond"] [B, C_cond, H, W]``, noises
    the target with the DDPM scheduler carried by ``inferer`` (MONAI ``DiffusionInferer``), and minimises
    :func:`hyper_dm.diffusion.training_loss`. ``engine.state.output`` holds the loss terms as floats
    (``loss``, ``mse``, in mode ``eu`` also ``diversity``) and the learning rate ``lr``, for the stats and
    TensorBoard handlers.

    Every epoch starts a fresh pass over ``train_data_loader`` (a new shuffle; with ``epoch_length`` shorter than
    the loader, the first ``epoch_length`` batches of it), so an epoch depends only on the random state at its
    start: a run resumed from an epoch checkpoint that holds that state (:class:`~hyper_dm.engines.RNGState`)
    repeats the uninterrupted run. (Ignite would otherwise continue the previous epoch's pass, which a new
    process cannot.)

    Under ``torch.distributed`` (``multi_gpu_train.yaml``) ``network`` is the HyperNetwork wrapped in
    ``DistributedDataParallel``: the weight sets are generated through the wrapper (so the gradients are averaged
    over the ranks), the latents and the backbone come from the HyperNetwork inside it, and the loss terms in
    ``state.output`` are the means over the ranks (the loss of the global batch, as one process would log it).

    Args:
        device: where the HyperNetwork and batches live.
        max_epochs: epochs to train.
        train_data_loader: yields dict batches with ``target`` and ``cond``.
        network: the HyperNetwork (or its DDP wrapper); its ``target`` module is the frozen backbone.
        optimizer: over ``network.trainable_parameters()``.
        inferer: ``DiffusionInferer`` whose ``scheduler`` (MONAI ``DDPMScheduler``) defines the forward process.
        loss: :class:`LossConfig` or its fields as a dict (``mode``, ``m_weights``, ``lambda_eu``, ...).
        probes: mode ``eu``: where its diversity term acts (:data:`~hyper_dm.diffusion.probes.PROBES`): ``"none"``
            (the batch's own inputs), ``"objects"`` (each input with random striped ellipses pasted in,
            :func:`~hyper_dm.diffusion.probes.random_objects`) or ``"objects_inside"`` (the same, the term inside
            the ellipses only).
        probe_columns: with probes and ``eu_term="kl"``, single-coil MRI: the KL acts on the part of the spread in
            k-space columns a random 4x / 8x mask leaves unmeasured (:func:`~hyper_dm.diffusion.probes.random_columns`).
        amp: mixed precision on CUDA (ignored, with a clean fallback, on the CPU).
        train_handlers: MONAI/Ignite handlers to attach.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        network: HyperNetwork,
        optimizer: torch.optim.Optimizer,
        inferer: DiffusionInferer,
        loss: LossConfig | dict,
        epoch_length: int | None = None,
        amp: bool = False,
        train_handlers: Sequence | None = None,
        probes: str = "none",
        probe_columns: bool = False,
    ) -> None:
        loss = loss if isinstance(loss, LossConfig) else LossConfig(**loss)
        refuse_ensemble(network)
        if probes not in PROBES:
            raise ConfigError(f"unknown probes {probes!r} (training_cfg#probes); expected one of {PROBES}")
        if probes != "none" and loss.mode != "eu":
            raise ConfigError(f"probes {probes!r} act on the diversity term of mode 'eu'; the mode is {loss.mode!r}")
        if probe_columns and (probes == "none" or loss.eu_term != "kl"):
            raise ConfigError("probe_columns (training_cfg#probe_columns) needs probes and eu_term 'kl', got "
                             f"probes {probes!r}, eu_term {loss.eu_term!r}")
        device = torch.device(device)
        amp = bool(amp) and device.type == "cuda"
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            handlers=train_handlers,
            amp=amp,
            decollate=False,
        )
        self.network = network
        self.optimizer = optimizer
        self.inferer = inferer
        self.loss_config, self.probes, self.probe_columns = loss, probes, bool(probe_columns)
        self.add_event_handler(Events.EPOCH_STARTED, self._new_pass)

    @staticmethod
    def _new_pass(engine: HyperDiffusionTrainer) -> None:
        """Start the epoch on a fresh iterator of the data loader (not mid-epoch, after an iteration checkpoint)."""
        if engine.state.epoch_length and engine.state.iteration % engine.state.epoch_length == 0:
            engine.set_data(engine.data_loader)

    def _iteration(self, engine: HyperDiffusionTrainer, batchdata: dict) -> dict[str, float]:
        for key in ("target", "cond"):
            if key not in batchdata:
                raise KeyError(f"training batch has no {key!r} entry (keys: {sorted(batchdata)})")
        target = batchdata["target"].to(engine.state.device, non_blocking=engine.non_blocking)
        cond = batchdata["cond"].to(engine.state.device, non_blocking=engine.non_blocking)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        hypernet = _Generator(engine.network)
        probe, pasted = random_objects(cond) if engine.probes != "none" else (None, None)
        columns = random_columns(cond.shape[0], cond.shape[-1]).to(cond.device) if engine.probe_columns else None
        with torch.autocast("cuda", enabled=engine.amp):
            terms = training_loss(
                hypernet, hypernet.target, engine.inferer.scheduler, target, cond, engine.loss_config, None, probe,
                pasted if engine.probes == "objects_inside" else None, columns,
            )
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if not torch.isfinite(terms["loss"]) and not engine.amp:  # under AMP the scaler skips overflowing steps
            raise FloatingPointError(
                f"non-finite loss {terms['loss'].item()} at iteration {engine.state.iteration}; lower training lr "
                "or lambda_eu, or resume from the last checkpoint"
            )
        if engine.amp and engine.scaler is not None:  # MONAI's Trainer.run creates the GradScaler
            engine.scaler.scale(terms["loss"]).backward()
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            terms["loss"].backward()
            engine.optimizer.step()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        values = torch.stack([v.detach().float() for v in terms.values()])  # [n_terms]
        _, world = rank_and_world()
        if world > 1:
            dist.all_reduce(values)
            values /= world
        return {**dict(zip(terms, values.tolist(), strict=True)), "lr": engine.optimizer.param_groups[0]["lr"]}


class GradScalerState:
    """The trainer's AMP ``GradScaler`` as a checkpoint entry (``state_dict`` / ``load_state_dict``).

    MONAI's ``Trainer.run`` creates the scaler when the run starts, before the checkpoint loader fires (Ignite's
    ``STARTED``), so the scaler is looked up on each call: its loss scale and growth tracker travel in the checkpoint
    and a resumed AMP run goes on with them instead of the initial scale. Without AMP the entry is empty.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict:
        scaler = getattr(self.trainer, "scaler", None)
        return scaler.state_dict() if scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        scaler = getattr(self.trainer, "scaler", None)
        if scaler is not None and state:
            scaler.load_state_dict(state)


class _Generator:
    """The HyperNetwork as :func:`training_loss` uses it: calling it goes through ``network`` (a DDP wrapper
    averages the gradients of what it generates), attributes (``sample_z``, ``target``) are the HyperNetwork's."""

    def __init__(self, network: torch.nn.Module) -> None:
        self.network, self.module = network, unwrap(network)

    def __call__(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.network(z)

    def __getattr__(self, name: str):
        return getattr(self.module, name)

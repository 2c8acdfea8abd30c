"""What the engines need of ``torch.distributed`` (``torchrun``, ``multi_gpu_train.yaml``/``multi_gpu_inference.yaml``).

- :func:`unwrap`: the HyperNetwork inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper.
- :func:`rank_and_world`: ``(rank, world_size)``, ``(0, 1)`` outside a process group.
- :func:`from_rank0`: run a function on rank 0 and give every rank its result, or its error (no rank left waiting).
- :func:`gather`: every rank's value, in rank order, on every rank (also a barrier).
- :func:`parameter_digest` and :class:`ReplicaCheck`: the trainable parameters of all ranks are compared after
  every epoch; DDP keeps them equal, so a difference (e.g. a learning-rate schedule stepped on one rank only) is an
  error naming the ranks.

Every function works unchanged in a single process.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from torch import nn

__all__ = ["ReplicaCheck", "from_rank0", "gather", "parameter_digest", "rank_and_world", "unwrap"]

logger = logging.getLogger("hyper_dm.distributed")

T = TypeVar("T")


def unwrap(network: nn.Module) -> nn.Module:
    """``network.module`` for a ``DistributedDataParallel``/``DataParallel`` wrapper, else ``network``."""
    if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return network.module
    return network


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when none is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(value: T) -> list[T]:
    """``value`` of every rank (picklable), indexed by rank, on every rank; ``[value]`` in a single process."""
    rank, world = rank_and_world()
    if world == 1:
        return [value]
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value)
    return values


def from_rank0(fn: Callable[[], T]) -> T:
    """``fn()`` computed on rank 0 only and returned on every rank (picklable). If it raises, rank 0 re-raises it and
    every other rank raises ``RuntimeError`` quoting it, so no rank waits for a result that never comes."""
    rank, world = rank_and_world()
    if world == 1:
        return fn()
    payload: list[Any] = [None]
    error: BaseException | None = None
    if rank == 0:
        try:
            payload[0] = ("ok", fn())
        except Exception as e:  # handed to the other ranks, then re-raised here
            error = e
            payload[0] = ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    status, value = payload[0]
    if status == "error":
        raise RuntimeError(f"rank 0 failed, so rank {rank} stops too: {value}")
    return value


def parameter_digest(module: nn.Module) -> str:
    """SHA-256 (hex) of the trainable parameters of ``module`` (names, dtypes, shapes and bytes, in order)."""
    digest = hashlib.sha256()
    for name, p in unwrap(module).named_parameters():
        if p.requires_grad:
            data = p.detach().cpu().contiguous()
            digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ReplicaCheck:
    """Ignite handler: after every epoch (and at the end of the run) each rank logs
    ``rank R/K: epoch E, iteration I, trainable parameters sha256 <hex>`` and the ranks compare their digests;
    a difference raises ``RuntimeError`` naming the ranks. Attach it on every rank (it is a collective).

    Args:
        network: the trained network (a DDP wrapper or the module itself).
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        rank, world = rank_and_world()
        digest = parameter_digest(self.network)
        logger.info("rank %d/%d: epoch %d, iteration %d, trainable parameters sha256 %s", rank, world,
                    engine.state.epoch, engine.state.iteration, digest)
        digests = gather(digest)
        if len(set(digests)) > 1:
            groups = {d: [r for r, x in enumerate(digests) if x == d] for d in digests}
            raise RuntimeError(f"the HyperNetwork replicas differ after epoch {engine.state.epoch}: ranks "
                               + " vs ".join(str(ranks) for ranks in groups.values())
                               + " (a handler that changes the weights or the learning rate on some ranks only?)")

"""The random state a training run continues from, as a checkpoint entry.

Example::

    >>> rng = RNGState(train_loader)
    >>> save_dict = {"hypernet": network, "optimizer": optimizer, "trainer": trainer, "rng": rng}
    >>> # CheckpointSaver(..., save_dict) / CheckpointLoader(..., load_dict=save_dict)

A run resumed from an epoch checkpoint then draws what the uninterrupted run drew: the shuffle, the training
physics noise, the diffusion timesteps and noise, the latent draws.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from monai.transforms import Randomizable

__all__ = ["RNGState"]


def _numpy_state(state: tuple) -> dict:
    """NumPy's ``RandomState.get_state()`` as tensors and numbers (``torch.load(weights_only=True)`` reads them)."""
    kind, keys, pos, has_gauss, cached = state
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_tuple(state: Mapping) -> tuple:
    keys = state["keys"].cpu().numpy().astype(np.uint32)
    return state["kind"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]


def _randomizables(transform: object) -> list[Randomizable]:
    """The MONAI random transforms in ``transform`` (a ``Compose`` is searched recursively)."""
    found = [transform] if isinstance(transform, Randomizable) else []
    for child in getattr(transform, "transforms", ()):
        found += _randomizables(child)
    return found


class RNGState:
    """Python ``random``, NumPy, torch (CPU and every CUDA device), the generator(s) of ``data_loader`` if it has
    any, and the ``R`` of every MONAI random transform of its dataset (they run in this process when
    ``num_workers=0``; workers are seeded from torch's state when the loader starts a pass).

    ``state_dict()`` holds tensors and numbers only; ``load_state_dict()`` puts them back.
    """

    def __init__(self, data_loader: Iterable | None = None) -> None:
        self.generators = []
        for owner in (data_loader, getattr(data_loader, "sampler", None)):
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator) and all(generator is not g for g in self.generators):
                self.generators.append(generator)
        self.transforms = _randomizables(getattr(getattr(data_loader, "dataset", None), "transform", None))

    def state_dict(self) -> dict:
        version, internal, gauss_next = random.getstate()
        return {
            "python": {"version": version, "internal": torch.tensor(internal), "gauss_next": gauss_next},
            "numpy": _numpy_state(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "generators": [g.get_state() for g in self.generators],
            "transforms": [_numpy_state(t.R.get_state()) for t in self.transforms],
        }

    def load_state_dict(self, state: Mapping) -> None:
        if len(state["generators"]) != len(self.generators) or len(state["transforms"]) != len(self.transforms):
            raise ValueError(f"the checkpoint holds {len(state['generators'])} data loader generator(s) and "
                             f"{len(state['transforms'])} random transform(s), this run has {len(self.generators)} "
                             f"and {len(self.transforms)}")
        python = state["python"]
        random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
        np.random.set_state(_numpy_tuple(state["numpy"]))
        torch.set_rng_state(state["torch"].cpu())
        if torch.cuda.is_available():
            for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state.cpu(), device)
        for generator, generator_state in zip(self.generators, state["generators"], strict=True):
            generator.set_state(generator_state.cpu())
        for transform, transform_state in zip(self.transforms, state["transforms"], strict=True):
            transform.R.set_state(_numpy_tuple(transform_state))

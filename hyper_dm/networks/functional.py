"""Running one backbone with M generated weight sets, each on its own input batch.

``weights`` is the dict a :class:`~hyper_dm.networks.hypernet.HyperNetwork` returns
(``name -> [M, *shape]``); inputs carry a leading ``M`` axis: ``x_t [M, B, ...]``, ``t [M, B]``,
``cond [M, B, ...]``. Two equivalent paths: a Python loop over ``M`` (default: on CPU it is as fast
as or faster than vmap for MONAI's U-Net, see ``scripts/benchmark.py``) and ``torch.func.vmap``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, vmap

__all__ = ["apply_weight_sets", "METHODS"]

METHODS = ("loop", "vmap")


def apply_weight_sets(
    backbone: nn.Module,
    weights: dict[str, torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    method: Literal["loop", "vmap"] = "loop",
) -> torch.Tensor:
    """Evaluate ``backbone`` with weight set ``m`` on inputs ``[m]`` for every ``m``: returns ``[M, B, ...]``."""
    m = x_t.shape[0]
    if any(w.shape[0] != m for w in weights.values()):
        raise ValueError(f"every weight tensor needs a leading axis of size M={m} (the inputs' first axis)")
    if method == "loop":
        return torch.stack(
            [
                functional_call(backbone, {k: w[i] for k, w in weights.items()}, (x_t[i], t[i], cond[i]))
                for i in range(m)
            ]
        )
    if method == "vmap":
        call = lambda w, x, tt, c: functional_call(backbone, w, (x, tt, c))  # noqa: E731
        return vmap(call, randomness="different")(weights, x_t, t, cond)
    raise ValueError(f"unknown evaluation method {method!r}; expected one of {METHODS}")

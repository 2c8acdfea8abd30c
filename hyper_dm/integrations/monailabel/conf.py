"""The app's settings (MONAI Label's ``--conf key value`` pairs) and the sampling parameters of one request.

Settings, all optional except ``ckpt``::

    ckpt        the trained HyperNetwork (``model.pt`` or a training checkpoint)
    config      a bundle overlay, e.g. bundle/configs/knee_singlecoil.yaml (default: CT, common.yaml alone)
    calibration the calibration JSON (default: calibration.json beside ckpt, used if present): adds the
                hyperdm_total_std_calibrated map and the input check of every reply
    input_mode  measured (default: a study is the sparse-view FBP volume / undersampled k-space) | simulate
    M, N, steps defaults of a request (4, 4 and the bundle's diffusion#ddim_steps)
    max_M, max_N, max_steps   the most a request may ask for (16, 16, 100)
    device      cpu | cuda | cuda:1 ... (default: cuda when available)
    auto_score  rescore the studies in the background at start-up and after each next sample (default true,
                MONAI Label's behaviour); scores of studies already scored with this checkpoint are kept
    expose      serve on a non-loopback address (default false: see hyper_dm.integrations.monailabel.safety)

Example::

    >>> conf = LabelConf.parse({"ckpt": "bundle/models/model.pt", "max_M": "8"})
    >>> conf.sampling({"M": 4, "N": "2"})             # a request's params -> Sampling(M=4, N=2, steps=...)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["LabelConf", "RequestError", "Sampling"]

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class RequestError(Exception):
    """A request the app refuses: ``status`` is the HTTP status, ``detail`` says what is wrong and what to do."""

    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, dict(headers or {})


@dataclass(frozen=True)
class Sampling:
    """M weight sets x N DDIM draws per weight set, with ``steps`` DDIM steps."""

    M: int
    N: int
    steps: int


@dataclass(frozen=True)
class LabelConf:
    """Parsed ``--conf`` settings (see the module docstring)."""

    ckpt: str
    config: str | None = None
    calibration: str | None = None
    input_mode: str = "measured"
    M: int = 4
    N: int = 4
    steps: int | None = None  # None: the bundle's diffusion#ddim_steps
    max_M: int = 16
    max_N: int = 16
    max_steps: int = 100
    device: str | None = None
    auto_score: bool = True
    expose: bool = False

    @classmethod
    def parse(cls, conf: Mapping[str, Any]) -> LabelConf:
        """Settings from MONAI Label's ``conf`` (string values); a missing ``ckpt`` or a malformed value is a
        ``ValueError`` naming the ``--conf`` key. Keys of MONAI Label itself (``models``, ...) are ignored."""
        if not conf.get("ckpt"):
            raise ValueError("the Hyper-DM app needs a checkpoint: add --conf ckpt /path/to/model.pt")
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in conf.items():
            if key not in known or raw is None:
                continue
            kind = known[key].type
            try:
                values[key] = _convert(str(raw), kind)
            except ValueError:
                raise ValueError(f"--conf {key} {raw!r}: expected {kind.split(' ')[0]}") from None
        parsed = cls(**values)
        if parsed.input_mode not in ("measured", "simulate"):
            raise ValueError(f"--conf input_mode {parsed.input_mode!r}: expected measured or simulate")
        for name in ("M", "N"):
            if not 2 <= getattr(parsed, name) <= getattr(parsed, f"max_{name}"):
                raise ValueError(f"--conf {name} {getattr(parsed, name)}: must be within 2..max_{name} "
                                 f"({getattr(parsed, f'max_{name}')})")
        if parsed.steps is not None and not 1 <= parsed.steps <= parsed.max_steps:
            raise ValueError(f"--conf steps {parsed.steps}: must be within 1..max_steps ({parsed.max_steps})")
        return parsed

    def sampling(self, params: Mapping[str, Any], default_steps: int) -> Sampling:
        """M, N, steps of a request (its JSON ``params``; defaults from the settings), checked against the limits.

        Raises :class:`RequestError` (422) naming the parameter and its allowed range.
        """
        limits = {"M": (2, self.max_M), "N": (2, self.max_N), "steps": (1, self.max_steps)}
        defaults = {"M": self.M, "N": self.N, "steps": self.steps or default_steps}
        chosen = {}
        for name, (low, high) in limits.items():
            value = params.get(name, defaults[name])
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise RequestError(422, f"{name}={value!r} is outside this server's limits: {name} must be an "
                                        f"integer in {low}..{high} (the server's --conf max_{name} sets the top)")
            chosen[name] = value
        return Sampling(**chosen)


def _convert(raw: str, kind: str) -> Any:
    if kind.startswith("bool"):
        if raw.lower() not in _TRUE + _FALSE:
            raise ValueError(raw)
        return raw.lower() in _TRUE
    if kind.startswith("int"):
        return int(raw)
    return raw

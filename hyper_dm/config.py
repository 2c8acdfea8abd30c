"""The one configuration system: MONAI bundle configs, overridden from seed-style ``a.b=v`` arguments.

The shared sections live in ``common.yaml``, merged first; ``train.yaml`` or ``inference.yaml`` adds a workflow
and a task overlay goes last (:func:`config_files_for`). Python code reads defaults from there
(:func:`bundle_section`) instead of repeating them. The configs ship inside the package (``hyper_dm/bundle`` links
to the repository's ``bundle/`` and is copied into wheels), so :data:`BUNDLE_CONFIGS` works from any install.

The bundle's hyperparameter sections are ``data``, ``model``, ``diffusion``, ``training_cfg`` and
``inference_cfg``, and ``export_cfg`` / ``findings_cfg`` in ``export.yaml`` (``training``/``inference``/``export``/
``findings`` are the run ids MONAI executes). The seed-style scripts keep
the seed's names, so ``training.lr=1e-4`` becomes the bundle override ``training_cfg#lr`` = ``1e-4``.
Overrides are checked against the merged configs: an unknown key is an error listing the close matches
(except a new argument of a component, a dict with ``_target_``), a value of the wrong type an error naming
the key.

Example:
    >>> translate_key("training.lr")
    'training_cfg#lr'
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import yaml
from monai.bundle import ConfigParser

__all__ = [
    "BUNDLE_CONFIGS",
    "COMMON_CONFIG",
    "SECTION_ALIASES",
    "ConfigError",
    "bundle_section",
    "check_literal",
    "config_files_for",
    "parse_choice",
    "parse_overrides",
    "translate_key",
    "validate_overrides",
]

BUNDLE_CONFIGS = (Path(__file__).resolve().parent / "bundle" / "configs").resolve()
COMMON_CONFIG = "common.yaml"
SECTION_ALIASES = {"training": "training_cfg", "inference": "inference_cfg", "export": "export_cfg",
                   "findings": "findings_cfg"}
WORKFLOW_CONFIGS = {"train": ("train.yaml",), "infer": ("inference.yaml",),
                    "export": ("inference.yaml", "export.yaml"), "findings": ("inference.yaml", "export.yaml")}


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message says which and what was expected."""


Choice = TypeVar("Choice", bound=Enum)


def parse_choice(choices: type[Choice], value: Any, key: str) -> Choice:
    """The member of the enum ``choices`` whose value is ``value``; anything else is a :class:`ConfigError` naming
    the config ``key`` and the valid values."""
    try:
        return choices(value)
    except ValueError:
        raise ConfigError(f"{key} must be one of {[m.value for m in choices]}, got {value!r}") from None


def translate_key(dotted: str) -> str:
    """Seed-style ``section.key.sub`` -> bundle id ``section_cfg#key#sub``."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"override key {dotted!r} has an empty part; expected e.g. training.lr=1e-4")
    parts[0] = SECTION_ALIASES.get(parts[0], parts[0])
    return "#".join(parts)


def parse_overrides(args: Sequence[str], allow_expressions: bool = False) -> dict[str, Any]:
    """``["training.lr=1e-4", "model.z_dim=16"]`` -> ``{"training_cfg#lr": 1e-4, "model#z_dim": 16}`` (YAML values).

    Values are literals: one starting with ``$``, ``@`` or ``%`` (which MONAI would evaluate as Python or resolve as
    a reference) is an error unless ``allow_expressions`` (see :func:`check_literal`)."""
    overrides = {}
    for arg in args:
        key, sep, text = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {arg!r} is not of the form key.subkey=value (e.g. training.lr=1e-4)")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {arg!r}: value {text!r} is not valid YAML ({err})") from err
        overrides[translate_key(key.strip())] = _number_or_text(value)
    if not allow_expressions:
        for cid, value in overrides.items():
            check_literal(cid, value)
    return overrides


def check_literal(cid: str, value: Any) -> None:
    """Refuse a command-line ``value`` for ``cid`` that MONAI's config parser would not take literally."""
    texts = value if isinstance(value, list | tuple) else value.values() if isinstance(value, dict) else [value]
    for text in texts:
        if isinstance(text, str) and text[:1] in ("$", "@", "%"):
            raise ConfigError(
                f"{_seed_name(cid)}={text!r}: a value starting with {text[0]!r} is evaluated by MONAI's config parser "
                "('$' runs Python, '@' and '%' are references), not taken literally. For an environment variable "
                "let the shell expand it (no quotes: data.dataset_dir=$HOME/LUNA16); to evaluate it on purpose "
                "pass --allow-expressions")


def _number_or_text(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as text; users mean a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def config_files_for(workflow: str, config: str | None) -> list[str]:
    """``common.yaml``, the configs of ``workflow`` (train: ``train.yaml``; infer: ``inference.yaml``; export and
    findings: ``inference.yaml`` + ``export.yaml``), then ``config`` unless it is one of those."""
    files = [BUNDLE_CONFIGS / COMMON_CONFIG, *(BUNDLE_CONFIGS / name for name in WORKFLOW_CONFIGS[workflow])]
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file {config} does not exist")
        if path.resolve() not in files:
            files.append(path)
    return [str(f) for f in files]


def bundle_section(section: str, workflow: str | None = None) -> Any:
    """``section`` as the bundle resolves it from ``common.yaml`` (and the config of ``workflow`` if given).

    Example:
        >>> bundle_section("model")["z_dim"]
        8
        >>> bundle_section("training_cfg", "train")["mode"]
        'standard'
    """
    files = config_files_for(workflow, None) if workflow else [str(BUNDLE_CONFIGS / COMMON_CONFIG)]
    parser = ConfigParser()
    parser.read_config(files)
    if section not in parser:
        raise ConfigError(f"no section {section!r} in {files}")
    return parser.get_parsed_content(section)


def _ids(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every id of a raw config (``a#b#0``) with its raw value."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        cid = f"{prefix}#{key}" if prefix else str(key)
        yield cid, value
        yield from _ids(value, cid)


def _seed_name(cid: str) -> str:
    head, _, rest = cid.partition("#")
    head = {v: k for k, v in SECTION_ALIASES.items()}.get(head, head)
    return ".".join([head, *rest.split("#")]) if rest else head


def _type_error(cid: str, current: Any, new: Any) -> str | None:
    if current is None or new is None or isinstance(current, str) and current.startswith(("$", "@", "%")):
        return None
    if isinstance(current, bool) or isinstance(new, bool):
        ok = isinstance(current, bool) and isinstance(new, bool)
    elif isinstance(current, float):
        ok = isinstance(new, (int, float))
    else:
        ok = isinstance(new, type(current))
    if ok:
        return None
    return f"{_seed_name(cid)} expects a {type(current).__name__} (like {current!r}), got {new!r}"


def validate_overrides(config_files: Sequence[str], overrides: dict[str, Any]) -> ConfigParser:
    """Merge ``config_files``, check every override id exists with a compatible type, apply them."""
    parser = ConfigParser()
    try:
        parser.read_config(list(config_files))
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config files {list(config_files)}: {err}") from err
    known = dict(_ids(parser.get()))
    for cid, value in overrides.items():
        parent = known.get(cid.rpartition("#")[0])
        if cid not in known and isinstance(parent, dict) and "_target_" in parent:
            parser[cid] = value  # a further constructor argument of a component: MONAI checks it when building
            continue
        if cid not in known:
            matches = difflib.get_close_matches(cid, list(known), n=5, cutoff=0.6)
            hint = ", ".join(_seed_name(m) for m in matches) if matches else "none; see the bundle configs"
            raise ConfigError(f"unknown config key {_seed_name(cid)!r} ({cid}); close matches: {hint}")
        problem = _type_error(cid, known[cid], value)
        if problem:
            raise ConfigError(problem)
        parser[cid] = value
    return parser

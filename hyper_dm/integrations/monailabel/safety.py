"""Where the server listens: loopback only, unless the operator exposes it deliberately.

MONAI Label's ``start_server`` listens on every interface (``--host 0.0.0.0``) unless told otherwise, and it serves
the studies, their reconstructions and a model without authentication by default. The app therefore refuses to
start on a non-loopback address unless ``--conf expose true`` is given; the launcher
(``python -m hyper_dm.integrations.monailabel``) passes ``--host 127.0.0.1`` itself.

Example::

    >>> server_host(["start_server", "--app", "a", "--studies", "s", "--host", "127.0.0.1"])
    '127.0.0.1'
    >>> check_bind("0.0.0.0", expose=False)        # raises PermissionError with the fix
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Sequence

__all__ = ["EXPOSE_HINT", "check_bind", "is_loopback", "server_host"]

EXPOSE_HINT = ("add --host 127.0.0.1 (this machine only), or, to serve other machines deliberately, --conf expose "
               "true with MONAI Label's authentication (MONAI_LABEL_AUTH_ENABLE) or a TLS proxy in front; see "
               "docs/monailabel.md")


def server_host(argv: Sequence[str]) -> str | None:
    """The address ``monailabel start_server`` arguments ``argv`` (without the program) bind; ``None`` when they
    are not a ``start_server`` command (e.g. MONAI Label's background scoring process)."""
    if not argv or argv[0] != "start_server":
        return None
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-i", "--host", default="0.0.0.0")  # MONAI Label 0.8.5's default
    return parser.parse_known_args(list(argv[1:]))[0].host


def is_loopback(host: str) -> bool:
    """``localhost`` or an address in 127.0.0.0/8 or ``::1``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def check_bind(host: str | None, expose: bool) -> None:
    """Refuse (``PermissionError``) a non-loopback ``host`` unless ``expose``; ``None`` (not a server) passes."""
    if host is None or expose or is_loopback(host):
        return
    raise PermissionError(f"the Hyper-DM app refuses to serve on {host!r}, which other machines can reach: "
                          f"{EXPOSE_HINT}")

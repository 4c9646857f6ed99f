"""systemd readiness notification (sd_notify) without a dependency.

With `Type=notify`, systemd considers the unit started only once the daemon sends READY=1
to the datagram socket named by $NOTIFY_SOCKET, so `systemctl start` returns after the
migrations ran and the admin port listens, not merely after the process forked.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)


def _address(name: str) -> str | bytes:
    # A leading '@' names a socket in the abstract namespace: the kernel wants a NUL there.
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send one notification; False when not run by systemd ($NOTIFY_SOCKET unset) or on error.

    Never raises: a daemon must not die because its supervisor's socket is gone.
    """
    name = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not name or name[0] not in "/@":
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(name))
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sdnotify.failed", socket=name, error=str(exc))
        return False
    return True


def ready(status: str = "", environ: Mapping[str, str] | None = None) -> bool:
    """Tell systemd the daemon is up (READY=1), with a one-line status for `systemctl status`."""
    line = status.replace("\n", " ")
    return notify(f"READY=1\nSTATUS={line}" if line else "READY=1", environ)


def stopping(environ: Mapping[str, str] | None = None) -> bool:
    """Tell systemd the daemon is shutting down (STOPPING=1), so the stop is not a crash."""
    return notify("STOPPING=1", environ)

"""systemd's readiness protocol (``sd_notify``) without libsystemd.

With ``Type=notify`` systemd considers the service started only when it receives
``READY=1`` on the datagram socket named by ``$NOTIFY_SOCKET``; cachefs sends it once the
FUSE mount is live, so units ordered after ``cachefs.service`` see a mounted view.
``STOPPING=1`` tells systemd the shutdown it asked for is under way.

``$NOTIFY_SOCKET`` is a filesystem path or, when it starts with ``@``, a name in the
abstract namespace (the ``@`` becomes a leading NUL byte). Without the variable every
call is a no-op, so the same code runs under systemd and from a shell.
"""

from __future__ import annotations

import os
import socket


def notify_address(environ: dict[str, str] | None = None) -> str | bytes | None:
    """The socket address from ``$NOTIFY_SOCKET`` as ``socket.sendto`` wants it."""
    env = os.environ if environ is None else environ
    raw = env.get("NOTIFY_SOCKET")
    if not raw:
        return None
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None  # systemd also knows vsock: addresses; we do not serve VMs' inits


def notify(message: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``); False if there is no socket to send to.

    Errors are swallowed on purpose: a lost notification must not take the mount down
    (systemd's start timeout reports it), exactly like ``sd_notify``.
    """
    address = notify_address(environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        return False
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))


__all__ = ["notify", "notify_address", "ready", "stopping"]

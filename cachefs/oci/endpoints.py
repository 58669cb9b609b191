"""Which scheme reaches a registry host: HTTPS, plain HTTP, or HTTPS then plain HTTP.

Why a fallback: docker and crane talk to ``localhost``, ``127.0.0.0/8`` and ``::1`` over
plain HTTP when HTTPS fails there, so a local ``registry:2`` needs no flag; podman does the
same for hosts registries.conf marks ``insecure = true`` (and skips certificate checks for
them). Only literal loopback names count: a name is never resolved to decide, so a DNS
answer cannot downgrade a connection. ``insecure = false`` written out for such a host turns
the fallback off. ``--insecure`` keeps its meaning: plain HTTP only, as ``msb pull
--insecure``.

When HTTPS is the only scheme and the server answers a TLS handshake with plain HTTP, or
its certificate is not trusted, the error says so at once: that is a configuration
mistake, not a transient failure worth retrying.
"""

from __future__ import annotations

import ipaddress
import ssl

# OpenSSL's reasons when the bytes after a ClientHello are an HTTP response, not TLS.
_PLAIN_HTTP_REASONS = frozenset({"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG",
                                 "RECORD_LAYER_FAILURE", "HTTP_REQUEST"})


def split_host(host: str) -> str:
    """``host[:port]`` or ``[v6]:port`` → the bare host name or address."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    name = split_host(host).lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def schemes_for(host: str, *, insecure_flag: bool, conf_insecure: bool | None) -> tuple[str, ...]:
    """The schemes to try for ``host``, in order."""
    if insecure_flag:
        return ("http",)
    if conf_insecure or (conf_insecure is None and is_loopback(host)):
        return ("https", "http")
    return ("https",)


def _ssl_error(err: BaseException) -> ssl.SSLError | None:
    """The ssl error under an httpx ConnectError (whose own message is often empty)."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLError):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def answered_plain_http(err: BaseException) -> bool:
    """Whether a failed connection was a TLS handshake met by a plain-HTTP server."""
    found = _ssl_error(err)
    return found is not None and (getattr(found, "reason", None) in _PLAIN_HTTP_REASONS
                                  or "wrong version number" in str(found))


def connection_refused(err: BaseException) -> bool:
    """Whether nothing listens there (every address refused): no retry will help.

    trio reports the attempts of one connect as an exception group under the OSError.
    """
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ConnectionRefusedError):
            return True
        if isinstance(cur, BaseExceptionGroup):
            return all(connection_refused(e) for e in cur.exceptions)
        cur = cur.__cause__ or cur.__context__
    return False


def untrusted_certificate(err: BaseException) -> str | None:
    """Why the server's certificate was refused, when that is why a connection failed."""
    found = _ssl_error(err)
    if isinstance(found, ssl.SSLCertVerificationError):
        return str(found.verify_message or found.reason or "verification failed")
    return None


__all__ = ["answered_plain_http", "connection_refused", "is_loopback", "schemes_for", "split_host",
           "untrusted_certificate"]

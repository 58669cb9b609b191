"""Which manifest of a multi-platform index is "ours".

msb picks ``linux/<host arch>`` (FORMATS.md §2.4): ``amd64`` on x86_64, ``arm64`` on aarch64.
A user may override with ``os/arch[/variant]``. Registries and OCI layouts share this logic,
so the "no match" message (which lists what *is* available) reads the same for both.
"""

from __future__ import annotations

import platform as _pyplatform
from collections.abc import Sequence

from ..errors import CachefsError, UsageError
from ..models import Descriptor, ImageConfigFile, Platform

_MACHINE_TO_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "i686": "386",
    "i386": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


LISTED_PLATFORMS = 10  # platforms named in a "no manifest for platform" message


def host_platform() -> Platform:
    """linux/<GOARCH of this machine>, as msb (oci-client) chooses by default."""
    machine = _pyplatform.machine()
    arch = _MACHINE_TO_ARCH.get(machine.lower(), machine.lower())
    return Platform(os="linux", architecture=arch)


def parse_platform(text: str) -> Platform:
    """``os/arch[/variant]`` (``--platform``); raises UsageError otherwise."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UsageError(f"invalid platform {text!r}: expected os/arch[/variant]")
    variant = parts[2] if len(parts) == 3 else None
    return Platform(os=parts[0], architecture=parts[1], variant=variant)


def image_platform(raw_config_json: str) -> Platform:
    """The platform an image config declares (its ``os``/``architecture``/``variant``)."""
    config = ImageConfigFile.model_validate_json(raw_config_json)
    return Platform(os=config.os, architecture=config.architecture, variant=config.variant)


def other_platform(raw_config_json: str, wanted: Platform) -> Platform | None:
    """The platform of a cached image when it is not ``wanted`` (None when it is)."""
    have = image_platform(raw_config_json)
    return None if platform_matches(have, wanted) else have


def format_platform(p: Platform | None) -> str:
    if p is None:
        return "(no platform)"
    out = f"{p.os}/{p.architecture}"
    return f"{out}/{p.variant}" if p.variant else out


def platform_matches(have: Platform, want: Platform) -> bool:
    """Does an index entry's ``have`` satisfy a request for ``want``?"""
    if have.os != want.os or have.architecture != want.architecture:
        return False
    if want.variant is None:
        return True
    # arm64 images often omit "v8"; treat absent as the default variant.
    return have.variant == want.variant or (
        have.variant is None and want.architecture == "arm64" and want.variant == "v8"
    )


def select_manifest(
    manifests: Sequence[Descriptor],
    want: Platform | None,
    *,
    source: str,
    error: type[CachefsError],
) -> Descriptor:
    """The first entry of an index matching ``want`` (default: the host platform).

    Without an explicit variant, an entry without variant (or ``v8`` for arm64) is preferred
    over other variants, like containerd's matcher. ``error`` is raised (with the available
    platforms listed) when nothing matches; ``source`` names the index in that message.
    """
    target = want or host_platform()
    candidates = [
        m for m in manifests
        if m.platform is not None and platform_matches(m.platform, target)
    ]
    if target.variant is None and len(candidates) > 1:
        preferred = [
            m for m in candidates
            if m.platform is not None and m.platform.variant in (None, "v8")
        ]
        candidates = preferred or candidates
    if candidates:
        return candidates[0]
    available = sorted(
        {
            format_platform(m.platform)
            for m in manifests
            if m.platform is None or m.platform.os != "unknown"
        }
    )
    raise error(
        f"{source}: no manifest for platform {format_platform(target)}; "
        f"available: {capped_list(available) or 'none'}",
        hint="choose one with --platform os/arch[/variant]",
    )


def capped_list(items: Sequence[str], shown: int = LISTED_PLATFORMS) -> str:
    """``a, b, … and 9,990 more``: an index may list any number of platforms, and a message
    must stay one readable line."""
    head = ", ".join(items[:shown])
    rest = len(items) - shown
    return f"{head} … and {rest:,} more" if rest > 0 else head


__all__ = [
    "capped_list",
    "format_platform",
    "host_platform",
    "parse_platform",
    "platform_matches",
    "select_manifest",
]

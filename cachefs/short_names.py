"""Pulling a short name (``debian:bookworm``) the way registries.conf says.

A short name is resolved by :meth:`RegistriesConf.expand_short_name`: its ``[aliases]``
entry, else each ``unqualified-search-registries`` entry in order (the first that can be
pulled wins, as podman), else Docker Hub (docker's and msb's rule; podman refuses). The
image is then cached under the fully-qualified name that was pulled, which the result
reports — as podman names the image it pulled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import CachefsError, NotCachedError, RegistryBlocked, RegistryError
from .pipeline.pull import pull

if TYPE_CHECKING:
    from .cache import GlobalCache
    from .oci.registries_conf import RegistriesConf
    from .pipeline.pull import PullResult


async def pull_short_name(cache: GlobalCache, text: str, *, registries: RegistriesConf,
                          **kw: Any) -> PullResult:
    """``pull`` the first candidate ``text`` stands for that succeeds."""
    candidates = registries.expand_short_name(text)
    if len(candidates) == 1:
        return await pull(cache, candidates[0], registries=registries, **kw)
    failures: list[str] = []
    uncached = 0
    for candidate in candidates:
        try:
            return await pull(cache, candidate, registries=registries, **kw)
        except RegistryBlocked as err:
            failures.append(err.one_line())
        except CachefsError as err:
            if not isinstance(err, (RegistryError, NotCachedError)):
                raise
            uncached += isinstance(err, NotCachedError)
            failures.append(f"{candidate}: {err.one_line()}")
    if uncached == len(candidates):
        raise NotCachedError(f"{text}: none of {', '.join(candidates)} is in the cache and "
                             "the pull policy is 'never'")
    raise RegistryError(
        f"{text}: no unqualified-search registry could provide it: {'; '.join(failures)}",
        hint="use a fully-qualified reference")


__all__ = ["pull_short_name"]

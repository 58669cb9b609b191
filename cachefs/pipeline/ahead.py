"""A registry pull's first layer blob, requested beside the config (issue 15, link row).

Over a slow link a pull is bound by bandwidth once blob bytes flow, so its wall time is
"first blob byte + bytes / bandwidth + tail": every round trip before the first blob byte
is added to the whole pull. The layers are known from the manifest, but the downloads start
only after the config, the artifact lookup and the pipeline's cache checks. So one blob
request goes out as soon as the manifest is read (:meth:`RegistryClient.request_blob_ahead`),
and that layer's download takes its answer: over the modelled 40 MB/s, 20 ms link the last
blob byte of the 3-layer Debian pull came ~20 ms sooner (docs/pull-profile.md, "Sixth
round (latency)").

Only one request, for the largest of the layers the pipeline downloads first (one flowing
blob keeps the link busy; the others follow a round trip later, as before), and only when
nothing of that blob is on disk (a kept ``.part`` is resumed with a range request, which a
whole-blob answer would not serve). Whether the layer is already converted is known only
from the config: if it is, or the EROFS artifact provided it, the answer is closed then;
what it let through is at most the socket buffers' worth. Every answer nobody took is
closed when the pull ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import trio

from ..cache import GlobalCache
from ..models import Descriptor, LayerMetadata
from ..reference import Reference

if TYPE_CHECKING:
    from ..oci.registry import RegistryClient

CONNECTIONS = 1  # the request sent ahead wants a connection beside the config's


class BlobAhead:
    """The request sent ahead for one pull; use :meth:`running` around the pull."""

    def __init__(self, registry: RegistryClient, cache: GlobalCache, ref: Reference,
                 first_layers: int) -> None:
        self._registry = registry
        self._cache = cache
        self._ref = ref
        self._first_layers = first_layers  # layers the pipeline starts downloading at once
        self._nursery: trio.Nursery | None = None
        self._sent: str | None = None  # its blob digest

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[BlobAhead]:
        """The requests live as long as the pull (the download may take the answer late);
        on the way out they are cancelled, and any answer nobody took is closed."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    yield self
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # the pull's own error, alone in the group: the tasks here never raise
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            self._nursery = None
            await self._registry.drop_ahead()

    def layers_known(self, layers: Sequence[Descriptor]) -> None:
        """The resolve's hook: request the largest of the first layers, unless something
        of its blob is on disk already."""
        if self._nursery is None or self._sent is not None or not layers:
            return
        first = list(layers)[: self._first_layers]
        largest = max(first, key=lambda d: d.size)
        digest = largest.parsed_digest
        # two stats on the trio thread, as the layer provider's own checks
        if self._cache.part_path(digest).exists() or self._cache.tar_path(digest).exists():
            return
        self._sent = largest.digest
        self._registry.request_blob_ahead(self._nursery, self._ref, largest)

    async def drop_if_built(self, layers: Sequence[LayerMetadata], force: bool) -> None:
        """Close the answer if its layer is converted already (cached before, or from the
        EROFS artifact) and not to be rebuilt: no download will take it."""
        sent = self._sent
        diff_ids = [layer.diff_digest for layer in layers if layer.digest == sent]
        if sent is None or not diff_ids or force:
            return
        if await trio.to_thread.run_sync(self._cache.is_layer_materialized, diff_ids[0]):
            await self._registry.drop_ahead()


__all__ = ["CONNECTIONS", "BlobAhead"]

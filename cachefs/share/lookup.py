"""Finding our EROFS artifacts for an image: the referrers API, else the tag schema.

Both are asked at once (one round trip on every registry); the API's answer wins when the
registry has the API. An unusable answer (not JSON, not an index) counts as "nothing
there", so a registry without either mechanism, or with a broken one, costs one round trip
and changes nothing else. The newest-listed artifact of ours comes first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from ..digest import Digest
from ..errors import CachefsError
from ..oci.push import RepoWriter
from ..oci.referrers import (
    ARTIFACT_TYPE,
    OCI_INDEX,
    ErofsArtifact,
    parse_artifact,
    pick_ours,
    referrer_descriptors,
    referrers_tag,
)

log = logging.getLogger(__name__)
MAX_CANDIDATES = 4  # our artifacts tried per subject (each is one manifest GET)


@dataclass(eq=False)  # compared nowhere: no generated __eq__
class Found:
    mechanism: str  # "referrers-api", "tag-schema" or "none"
    artifacts: list[tuple[Digest, ErofsArtifact]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def referrer_digests(session: RepoWriter, subject: Digest,
                           problems: list[str] | None = None) -> tuple[str, list[Digest]]:
    """(mechanism, digests of our artifacts) from whichever mechanism the registry has.

    A mechanism whose request fails (refused, oversized, unreachable) counts as absent;
    why is appended to ``problems``.
    """
    answers: dict[str, bytes | None] = {}

    async def ask(name: str, path: str) -> None:
        try:
            answers[name] = await session.get_document(path, OCI_INDEX)
        except CachefsError as err:
            answers[name] = None
            if problems is not None:
                problems.append(f"{name} lookup failed: {err.one_line()}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, "referrers-api",
                           f"referrers/{subject}?artifactType={ARTIFACT_TYPE}")
        nursery.start_soon(ask, "tag-schema", f"manifests/{referrers_tag(subject)}")
    for mechanism in ("referrers-api", "tag-schema"):
        body = answers.get(mechanism)
        if body is None:
            continue
        try:
            return mechanism, pick_ours(referrer_descriptors(body))
        except CachefsError as err:
            log.debug("ignoring %s answer: %s", mechanism, err)
    return "none", []


async def find_artifacts(session: RepoWriter, subject: Digest) -> Found:
    problems: list[str] = []
    mechanism, digests = await referrer_digests(session, subject, problems)
    found = Found(mechanism, problems=problems)
    for digest in digests[:MAX_CANDIDATES]:
        body = await session.get_document(f"manifests/{digest}")
        if body is None:
            found.problems.append(f"artifact {digest} is listed but missing")
            continue
        try:
            if Digest.sha256_of(body) != digest and digest.algorithm == "sha256":
                raise CachefsError(f"artifact manifest does not hash to {digest}")
            found.artifacts.append((digest, parse_artifact(body, subject)))
        except CachefsError as err:
            found.problems.append(f"artifact {digest}: {err.one_line()}")
    return found


class PendingLookup:
    """One :func:`find_artifacts` in flight, started before anyone needs its answer; the
    answer (or the error, raised as if asked then) goes to whoever waits for it."""

    def __init__(self, subject: Digest) -> None:
        self.subject = subject
        self._done = trio.Event()
        self._found: Found | None = None
        self._error: Exception | None = None

    async def run(self, session: RepoWriter) -> None:
        try:
            self._found = await find_artifacts(session, self.subject)
        except Exception as err:  # for result(): its caller decides what an error means
            self._error = err
        finally:
            self._done.set()

    async def result(self) -> Found:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._found is not None
        return self._found

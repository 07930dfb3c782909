"""Pull-through policy: what to answer from the cache, what to fetch, what to serve stale.

- blobs: committed in the store -> serve the file; being fetched -> follow that fetch; else start the one
  fetch for the digest (see :mod:`dao.mirror.inflight`).
- manifests by digest: immutable, cached forever once their bytes hash to the digest.
- manifests by tag: cached per set of accepted media types; re-validated by a HEAD upstream after the TTL;
  served stale (with a ``Warning``) when the upstream is unreachable, times out, rate-limits or refuses us.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from dao.mirror.inflight import Fetch, Inflight
from dao.mirror.storage.base import BlobStore, LocalBlob, ManifestRecord, ManifestStore
from dao.oci.digest import Digest, DigestError
from dao.oci.errors import ErrorCode, RegistryError
from dao.oci.manifest import accept_key, acceptable
from dao.registry.client import RegistryClient
from dao.registry.download import DownloadPolicy
from dao.registry.errors import (
    RegistryClientError,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamStatusError,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)

STALE_WARNING = '110 dao "Response is Stale"'

# Upstream failures after which a cached tag is still a good answer.
_STALE_OK = (UpstreamUnavailable, UpstreamRateLimited, UpstreamUnauthorized, TimeoutError)


@dataclass(frozen=True, slots=True)
class ManifestAnswer:
    body: bytes
    media_type: str
    digest: Digest
    cache: str  # "hit", "miss", "revalidated", "stale"

    @property
    def stale(self) -> bool:
        return self.cache == "stale"


@dataclass(slots=True)
class BlobAnswer:
    """Either a committed file (``local``) or a fetch to follow (``fetch``); ``size`` None = unknown yet."""

    size: int | None
    local: LocalBlob | None = None
    fetch: Fetch | None = None
    cache: str = "hit"


class Proxy:
    def __init__(
        self,
        client: RegistryClient,
        blobs: BlobStore,
        manifests: ManifestStore,
        *,
        manifest_ttl: float,
        manifest_timeout: float,
        download: DownloadPolicy | None = None,
    ) -> None:
        self.client = client
        self.blobs = blobs
        self.manifests = manifests
        self.inflight = Inflight(blobs, download)
        self.manifest_ttl = manifest_ttl
        self.manifest_timeout = manifest_timeout
        self.upstream_key = client.host

    # -- blobs ---------------------------------------------------------------------------------------------

    async def open_blob(self, repo: str, digest: Digest) -> BlobAnswer:
        """Raises :class:`RegistryError` (BLOB_UNKNOWN, upstream errors) before any byte is promised.

        The caller closes ``local`` or releases ``fetch`` when done with the answer.
        """
        local = await self.blobs.open(digest)
        if local is not None:
            return BlobAnswer(local.size, local=local)
        fetch, started = self.inflight.join_or_start(digest, self.client.blob_source(repo, digest))
        try:
            await asyncio.shield(fetch.headers_ready)
        except RegistryClientError as exc:
            fetch.release()
            raise upstream_error(exc, ErrorCode.BLOB_UNKNOWN) from exc
        except BaseException:
            fetch.release()
            raise
        return BlobAnswer(fetch.size, fetch=fetch, cache="miss" if started else "join")

    async def stat_blob(self, repo: str, digest: Digest) -> tuple[int | None, str]:
        size = await self.blobs.stat(digest)
        if size is not None:
            return size, "hit"
        fetch = self.inflight.get(digest)
        if fetch is not None and fetch.headers_ready.done() and fetch.error is None:
            return fetch.size, "join"
        try:
            return await self.client.head_blob(repo, digest), "miss"
        except RegistryClientError as exc:
            raise upstream_error(exc, ErrorCode.BLOB_UNKNOWN) from exc

    # -- manifests -----------------------------------------------------------------------------------------

    async def manifest(self, repo: str, reference: str, accept: tuple[str, ...]) -> ManifestAnswer:
        try:
            digest = Digest.parse(reference) if ":" in reference else None
        except DigestError as exc:
            raise RegistryError(ErrorCode.DIGEST_INVALID, str(exc)) from exc
        if digest is not None:
            return await self._manifest_by_digest(repo, digest, accept)
        return await self._manifest_by_tag(repo, reference, accept)

    async def _manifest_by_digest(self, repo: str, digest: Digest, accept: tuple[str, ...]) -> ManifestAnswer:
        cached = await self.manifests.get(digest)
        if cached is not None and acceptable(cached[1], accept):
            return ManifestAnswer(cached[0], cached[1], digest, "hit")
        fetched = await self._fetch_manifest(repo, str(digest), accept)
        return ManifestAnswer(fetched.body, fetched.media_type, fetched.digest, "miss")

    async def _manifest_by_tag(self, repo: str, tag: str, accept: tuple[str, ...]) -> ManifestAnswer:
        key = accept_key(accept)
        record = await self.manifests.get_tag(self.upstream_key, repo, tag, key)
        cached = await self.manifests.get(record.digest) if record else None
        if record is not None and cached is not None:
            body, media_type = cached
            if time.time() - record.checked_at < self.manifest_ttl:
                return ManifestAnswer(body, media_type, record.digest, "hit")
            try:
                async with asyncio.timeout(self.manifest_timeout):
                    head = await self.client.head_manifest(repo, tag, accept)
            except _STALE_OK as exc:
                log.warning("serving %s:%s stale: %s", repo, tag, exc)
                return ManifestAnswer(body, media_type, record.digest, "stale")
            except RegistryClientError as exc:
                raise upstream_error(exc, ErrorCode.MANIFEST_UNKNOWN) from exc
            if head.digest == record.digest:
                await self._record_tag(repo, tag, key, record.digest, media_type)
                return ManifestAnswer(body, media_type, record.digest, "revalidated")
        try:
            fetched = await self._fetch_manifest(repo, tag, accept)
        except RegistryError:
            if record is None or cached is None:
                raise
            # The refresh failed after the HEAD said "changed": the old answer beats none.
            return ManifestAnswer(cached[0], cached[1], record.digest, "stale")
        await self._record_tag(repo, tag, key, fetched.digest, fetched.media_type)
        return ManifestAnswer(fetched.body, fetched.media_type, fetched.digest, "miss")

    async def _fetch_manifest(self, repo: str, reference: str, accept: tuple[str, ...]) -> ManifestAnswer:
        try:
            async with asyncio.timeout(self.manifest_timeout):
                m = await self.client.get_manifest(repo, reference, accept)
        except TimeoutError as exc:
            raise RegistryError(ErrorCode.UNAVAILABLE, "upstream registry timed out") from exc
        except RegistryClientError as exc:
            raise upstream_error(exc, ErrorCode.MANIFEST_UNKNOWN) from exc
        await self.manifests.put(m.digest, m.body, m.media_type)
        return ManifestAnswer(m.body, m.media_type, m.digest, "miss")

    async def _record_tag(self, repo: str, tag: str, key: str, digest: Digest, media_type: str) -> None:
        record = ManifestRecord(digest, media_type, time.time())
        await self.manifests.put_tag(self.upstream_key, repo, tag, key, record)

    # -- pass-through --------------------------------------------------------------------------------------

    async def tags(self, repo: str, query: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        try:
            async with asyncio.timeout(self.manifest_timeout):
                return await self.client.raw_get(
                    f"/v2/{repo}/tags/list", scope=f"repository:{repo}:pull", params=query or None
                )
        except TimeoutError as exc:
            raise RegistryError(ErrorCode.UNAVAILABLE, "upstream registry timed out") from exc
        except RegistryClientError as exc:
            raise upstream_error(exc, ErrorCode.NAME_UNKNOWN) from exc

    async def aclose(self) -> None:
        await self.inflight.aclose()


def upstream_error(exc: RegistryClientError, not_found: ErrorCode) -> RegistryError:
    """The answer a client gets for an upstream failure: the upstream's own 404/401/429, else 502/503."""
    if isinstance(exc, UpstreamNotFound):
        return RegistryError(not_found, str(exc))
    if isinstance(exc, UpstreamRateLimited):
        return RegistryError(ErrorCode.TOOMANYREQUESTS, f"upstream registry rate limit: {exc}")
    if isinstance(exc, UpstreamUnauthorized):
        # Never a 401 of our own: the client would look for a challenge we do not issue.
        return RegistryError(ErrorCode.DENIED, f"upstream registry refused the mirror: {exc}")
    if isinstance(exc, UpstreamStatusError) and 400 <= exc.status < 500:
        return RegistryError(ErrorCode.UPSTREAM_ERROR, str(exc), status=502)
    return RegistryError(ErrorCode.UNAVAILABLE, f"upstream registry unavailable: {exc}")

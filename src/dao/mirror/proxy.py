"""Pull-through policy: what to answer from the cache, what to fetch, what to serve stale.

- blobs: committed in the store -> serve the file; being fetched -> follow that fetch; else start the one
  fetch for the digest (see :mod:`dao.mirror.inflight`).
- manifests by digest: immutable, cached forever once their bytes hash to the digest.
- manifests by tag: cached per set of accepted media types. Fresh for ``manifest_ttl``; then, for
  ``manifest_swr`` more, answered from cache at once while a background HEAD re-validates (stale while
  revalidate); after that the client waits for the HEAD. Served stale (with a ``Warning``) when the upstream
  is unreachable, times out, rate-limits or refuses us (stale if error). A HEAD is all a re-validation costs;
  the manifest is fetched again only when the tag moved.
- indexes: every child manifest is fetched into the cache behind the client's back (:mod:`.children`), so
  another platform (or the same one, by digest) pulls when the upstream is gone.
- every upstream conversation goes through the circuit breaker and 404s through the negative cache (see
  :mod:`dao.mirror.availability`).
- what is shared between users and repositories: see :mod:`dao.mirror.sharing`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dao.config import MirrorConfig
from dao.mirror.availability import CircuitBreaker, CircuitOpen, NegativeCache
from dao.mirror.children import Children
from dao.mirror.errors import (
    BadDigest,
    Busy,
    MirrorError,
    NotFound,
    Remembered,
    Subject,
    UpstreamDown,
    upstream_error,
)
from dao.mirror.inflight import Fetch, FetchQueueFull, Inflight
from dao.mirror.local import LocalSources, prefetch_blobs
from dao.mirror.metrics import Metrics
from dao.mirror.planning import FetchPlan, Planner
from dao.mirror.sharing import Sharing
from dao.mirror.storage.base import BlobStore, LocalBlob, ManifestRecord, ManifestStore, Origin, OriginStore
from dao.oci.digest import Digest, DigestError
from dao.oci.manifest import IMAGE_MANIFEST_TYPES, INDEX_TYPES, accept_key, acceptable
from dao.registry.client import RegistryClient

if TYPE_CHECKING:
    from dao.mirror.cluster import Cluster

from dao.registry.errors import (
    RegistryClientError,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)

STALE_WARNING = '110 dao "Response is Stale"'

CHECK_POLL = 0.2  # seconds between looks at a tag record another node is re-validating

# Upstream failures after which a cached tag is still a good answer.
_STALE_OK = (UpstreamUnavailable, UpstreamRateLimited, UpstreamUnauthorized, TimeoutError, CircuitOpen)
# What says "the upstream is in trouble" (as opposed to an answer such as 404 or 401) to the circuit breaker.
_BREAKER_FAILURES = (UpstreamUnavailable, UpstreamRateLimited, TimeoutError)


@dataclass(frozen=True, slots=True)
class ManifestAnswer:
    body: bytes
    media_type: str
    digest: Digest
    cache: str  # "hit", "miss", "swr" (cached, refreshing behind), "revalidated", "stale" (upstream failing)

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
    redirect: str | None = None  # a URL the client fetches the bytes from (the bucket's, presigned)


class Proxy:
    def __init__(
        self,
        client: RegistryClient,
        blobs: BlobStore,
        manifests: ManifestStore,
        *,
        manifest_ttl: float = MirrorConfig.manifest_ttl,
        manifest_timeout: float = MirrorConfig.manifest_timeout,
        manifest_swr: float = MirrorConfig.manifest_swr,
        negative_ttl: float = MirrorConfig.negative_ttl,
        breaker: CircuitBreaker | None = None,
        prefetch_children: bool = MirrorConfig.prefetch_children,
        inflight: Inflight | None = None,
        metrics: Metrics | None = None,
        registry: str = "",
        origins: OriginStore | None = None,
        allowed: Callable[[str, str], bool] | None = None,
        cluster: Cluster | None = None,
        sources: LocalSources | None = None,
    ) -> None:
        """``inflight`` is shared by every registry's proxy over one store: a layer two registries both
        serve is fetched once and stored once. ``sources``: the local accelerator's, each blob read from all
        of them at once."""
        self.client = client
        self.blobs = blobs
        self.manifests = manifests
        self.inflight = inflight if inflight is not None else Inflight(blobs)  # an empty one is falsy (__len__)
        self.metrics = metrics
        self.registry = registry or client.host
        self.manifest_ttl = manifest_ttl
        self.manifest_timeout = manifest_timeout
        self.manifest_swr = manifest_swr
        self.negative = NegativeCache(negative_ttl)
        self.breaker = breaker or CircuitBreaker(
            client.host, threshold=MirrorConfig.breaker_failures, cooldown=MirrorConfig.breaker_cooldown
        )
        self.prefetch_children = prefetch_children
        self.cluster = cluster
        self.sources = sources
        self.planner = Planner(blobs, cluster, client.session)
        self.upstream_key = client.host
        self.sharing = Sharing(origins, allowed, self.registry, credentialed=client.auth.credentials is not None)
        self._background: dict[tuple[str, ...], asyncio.Task[None]] = {}
        self.children = Children(manifests, self._fetch_manifest)

    @asynccontextmanager
    async def _upstream(self, kind: str) -> AsyncIterator[None]:
        """Wrap every upstream conversation: refused at once while the circuit is open, outcome recorded."""
        self.breaker.check()
        started = time.monotonic()
        try:
            yield
        except BaseException as exc:
            self._count(exc)
            raise
        finally:
            self._observe(kind, started)
        self.breaker.success()

    def _observe(self, kind: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.upstream_seconds.labels(self.registry, kind).observe(time.monotonic() - started)

    def _count_upstream_bytes(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.upstream_bytes.labels(self.registry).inc(n)

    # -- blobs ---------------------------------------------------------------------------------------------

    async def open_blob(self, repo: str, digest: Digest, client: str = "") -> BlobAnswer:
        """Raises a :class:`~dao.mirror.errors.MirrorError` (not found, upstream errors, a full fetch queue)
        before any byte is promised. ``client``: the address asking, whose new upstream fetches are bounded.

        The caller closes ``local`` or releases ``fetch`` when done with the answer.
        """
        local = await self.blobs.open(digest)
        if local is not None:
            try:
                await self._check_shared(repo, digest, "blob")
            except BaseException:
                local.close()
                raise
            return BlobAnswer(local.size, local=local)
        redirector = getattr(self.blobs, "redirect_url", None)  # object storage with --redirect
        found = await redirector(digest) if redirector is not None else None
        if found is not None:
            await self._check_shared(repo, digest, "blob")
            return BlobAnswer(found[1], cache="redirect", redirect=found[0])
        key = ("blob", repo, str(digest))
        running = self.inflight.get(digest)
        aside = self.sources.aside(self.client, repo, digest) if self.sources is not None and running is None else None
        if aside is not None:  # the local accelerator's sources are as near as it is: the engine reads them
            return BlobAnswer(None, cache="aside", redirect=aside)
        if running is not None and running.origin != self.sharing.origin(repo):
            await self._check_shared(repo, digest, "blob", also=running.origin)
        plan = FetchPlan(self.client.blob_source(repo, digest), self._count_upstream_bytes)
        if self.sources is not None:
            views = self.sources(self.client, self.registry, repo, digest)
            plan = dataclasses.replace(plan, sources=views)
        if running is None:
            plan = await self.planner.plan(
                digest, plan, lambda: self._check_shared(repo, digest, "blob"), lambda: self._may_fetch(key)
            )
        try:
            fetch, started = await self.inflight.join_or_start(
                digest, plan.reads, plan.on_bytes, client, commit=plan.commit, kind=plan.kind, policy=plan.policy
            )
        except FetchQueueFull as exc:  # our own queue: says nothing about the upstream, never trips the breaker
            if self.cluster is not None and self.inflight.get(digest) is None:
                await self.cluster.release(digest)
            raise Busy(str(exc), retry_after=5) from exc
        upstream = started and plan.kind == "upstream"
        began = time.monotonic()
        try:
            await asyncio.shield(fetch.headers_ready)
        except RegistryClientError as exc:
            fetch.release()
            if upstream:
                self._count(exc)
                await self._remember_missing(key, exc)
            raise upstream_error(exc, "blob") from exc
        except BaseException:
            fetch.release()
            raise
        if started:
            fetch.origin = self.sharing.origin(repo)
        if upstream:
            self._observe("blob", began)
            self.breaker.success()
            await self.sharing.record(digest, repo)  # the upstream answered for this repository: it is there
        cache = ("miss" if plan.kind == "upstream" else plan.kind) if started else "join"
        return BlobAnswer(fetch.size, fetch=fetch, cache=cache)

    async def _may_fetch(self, key: tuple[str, ...]) -> None:
        """Raises unless the upstream may be asked for this blob: no remembered 404, the circuit closed."""
        await self._check_negative(key, "blob")
        try:
            self.breaker.check()
        except CircuitOpen as exc:
            raise upstream_error(exc, "blob") from exc

    async def stat_blob(self, repo: str, digest: Digest) -> tuple[int | None, str]:
        size = await self.blobs.stat(digest)
        if size is not None:
            await self._check_shared(repo, digest, "blob")
            return size, "hit"
        fetch = self.inflight.get(digest)
        if fetch is not None and fetch.headers_ready.done() and fetch.error is None:
            return fetch.size, "join"
        key = ("blob", repo, str(digest))
        await self._check_negative(key, "blob")
        try:
            async with self._upstream("blob_head"):
                return await self.client.head_blob(repo, digest), "miss"
        except (RegistryClientError, CircuitOpen) as exc:
            await self._remember_missing(key, exc)
            raise upstream_error(exc, "blob") from exc

    # -- manifests -----------------------------------------------------------------------------------------

    async def manifest(self, repo: str, reference: str, accept: tuple[str, ...]) -> ManifestAnswer:
        try:
            digest = Digest.parse(reference) if ":" in reference else None
        except DigestError as exc:
            raise BadDigest(str(exc)) from exc
        began = time.monotonic()  # a manifest from upstream times how far the local accelerator's sources are
        if digest is not None:
            answer = await self._manifest_by_digest(repo, digest, accept)
        else:
            answer = await self._manifest_by_tag(repo, reference, accept)
        if self.prefetch_children and answer.media_type in INDEX_TYPES and answer.digest not in self.children.complete:
            self._in_background(("children", str(answer.digest)), self.children.cache(repo, answer.digest, answer.body))
        if self.sources is not None and answer.media_type in IMAGE_MANIFEST_TYPES:  # the local accelerator
            window = self.sources.prefetch_window(self.client, answer.cache, time.monotonic() - began)
            if window != 0:
                self._in_background(("blobs", str(answer.digest)), prefetch_blobs(self, repo, answer.body, window))
        return answer

    async def _manifest_by_digest(self, repo: str, digest: Digest, accept: tuple[str, ...]) -> ManifestAnswer:
        cached = await self.manifests.get(digest)
        if cached is not None and acceptable(cached[1], accept):
            await self._check_shared(repo, digest, "manifest", manifest=cached[1])
            return ManifestAnswer(cached[0], cached[1], digest, "hit")
        fetched = await self._fetch_manifest(repo, str(digest), accept)
        return ManifestAnswer(fetched.body, fetched.media_type, fetched.digest, "miss")

    async def _manifest_by_tag(self, repo: str, tag: str, accept: tuple[str, ...]) -> ManifestAnswer:
        key = accept_key(accept)
        record = await self.manifests.get_tag(self.upstream_key, repo, tag, key)
        cached = await self.manifests.get(record.digest) if record else None
        if record is None or cached is None:
            fetched = await self._fetch_manifest(repo, tag, accept)
            await self._record_tag(repo, tag, key, fetched.digest, fetched.media_type)
            return fetched
        body, media_type = cached
        age = time.time() - record.checked_at
        if age < self.manifest_ttl:
            return ManifestAnswer(body, media_type, record.digest, "hit")
        if age < self.manifest_ttl + self.manifest_swr:
            # Stale-while-revalidate: this client gets the cached answer now; the next one gets the refresh.
            refresh = self._refresh_tag(repo, tag, accept, key, record.digest, media_type)
            self._in_background(("tag", repo, tag, key), refresh)
            return ManifestAnswer(body, media_type, record.digest, "swr")
        if not await self._first_to_check(repo, tag, key):
            checked = await self._checked_elsewhere(repo, tag, key, record.checked_at)
            if checked is not None:
                return checked
        try:
            moved = await self._revalidate(repo, tag, accept, key, record.digest, media_type)
        except _STALE_OK as exc:
            log.warning("serving %s:%s stale: %s", repo, tag, exc)
            return ManifestAnswer(body, media_type, record.digest, "stale")
        except RegistryClientError as exc:
            raise upstream_error(exc, "manifest") from exc
        except MirrorError:
            # The refresh failed after the HEAD said "changed": the old answer beats none.
            return ManifestAnswer(body, media_type, record.digest, "stale")
        return moved or ManifestAnswer(body, media_type, record.digest, "revalidated")

    async def _revalidate(
        self, repo: str, tag: str, accept: tuple[str, ...], key: str, known: Digest, media_type: str
    ) -> ManifestAnswer | None:
        """A HEAD of the tag; the manifest itself only when the tag moved (returned; None: it still names
        ``known``). Either way the tag is recorded as checked now. The HEAD fails with a
        ``RegistryClientError`` (or ``TimeoutError``, ``CircuitOpen``), the fetch with a ``MirrorError``."""
        async with self._upstream("manifest_head"), asyncio.timeout(self.manifest_timeout):
            head = await self.client.head_manifest(repo, tag, accept)
        if head.digest == known:
            await self._record_tag(repo, tag, key, known, media_type)
            return None
        fetched = await self._fetch_manifest(repo, tag, accept)
        await self._record_tag(repo, tag, key, fetched.digest, fetched.media_type)
        return fetched

    async def _refresh_tag(
        self, repo: str, tag: str, accept: tuple[str, ...], key: str, known: Digest, media_type: str
    ) -> None:
        """Background revalidation: its failures only leave the cached copy in place."""
        if not await self._first_to_check(repo, tag, key):
            return  # another node checks it right now, and writes the record every node reads
        try:
            await self._revalidate(repo, tag, accept, key, known, media_type)
        except (RegistryClientError, MirrorError, CircuitOpen, TimeoutError) as exc:
            log.warning("background refresh of %s:%s failed, cached copy kept: %s", repo, tag, exc)

    async def _first_to_check(self, repo: str, tag: str, key: str) -> bool:
        """Of the nodes that find a tag due at once, one asks the upstream (always this one, alone)."""
        if self.cluster is None:
            return True
        return await self.cluster.first(("tag", self.upstream_key, repo, tag, key), self.manifest_timeout + 1)

    async def _checked_elsewhere(self, repo: str, tag: str, key: str, since: float) -> ManifestAnswer | None:
        """The answer another node's re-validation recorded, once it has (None: not within the timeout)."""
        deadline = time.monotonic() + self.manifest_timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(CHECK_POLL)
            record = await self.manifests.get_tag(self.upstream_key, repo, tag, key)
            if record is not None and record.checked_at > since:
                cached = await self.manifests.get(record.digest)
                if cached is not None:
                    return ManifestAnswer(cached[0], cached[1], record.digest, "revalidated")
        return None

    async def _fetch_manifest(self, repo: str, reference: str, accept: tuple[str, ...]) -> ManifestAnswer:
        key = ("manifest", repo, reference)
        await self._check_negative(key, "manifest")
        try:
            async with self._upstream("manifest"), asyncio.timeout(self.manifest_timeout):
                m = await self.client.get_manifest(repo, reference, accept)
        except TimeoutError as exc:
            raise UpstreamDown("upstream registry timed out") from exc
        except (RegistryClientError, CircuitOpen) as exc:
            await self._remember_missing(key, exc)
            raise upstream_error(exc, "manifest") from exc
        await self.manifests.put(m.digest, m.body, m.media_type)
        await self.sharing.record(m.digest, repo)
        return ManifestAnswer(m.body, m.media_type, m.digest, "miss")

    async def _record_tag(self, repo: str, tag: str, key: str, digest: Digest, media_type: str) -> None:
        record = ManifestRecord(digest, media_type, time.time())
        await self.manifests.put_tag(self.upstream_key, repo, tag, key, record)

    # -- what is shared across repositories ----------------------------------------------------------------

    async def _check_shared(
        self, repo: str, digest: Digest, subject: Subject, *, also: Origin | None = None, manifest: str = ""
    ) -> None:
        """Raises :class:`NotFound` unless ``digest`` may be served through ``repo``: it was seen there, it is
        public content some allowed repository has, or the upstream confirms (a HEAD) it belongs to ``repo``."""
        if not await self.sharing.must_confirm(repo, digest, also):
            return
        try:
            async with self._upstream("manifest_head" if manifest else "blob_head"):
                if manifest:
                    await self.client.head_manifest(repo, str(digest), (manifest,))
                else:
                    await self.client.head_blob(repo, digest)
        except (UpstreamNotFound, UpstreamUnauthorized) as exc:
            raise NotFound(subject, f"{digest} is not known in {repo}") from exc
        except (RegistryClientError, CircuitOpen) as exc:
            raise upstream_error(exc, subject) from exc
        await self.sharing.record(digest, repo)

    # -- negative cache and background work ----------------------------------------------------------------

    async def _check_negative(self, key: tuple[str, ...], subject: Subject) -> None:
        """Raises :class:`Remembered` for a 404 this node (or, with ``--redis``, any node) got lately."""
        if key in self.negative or (
            self.cluster is not None and await self.cluster.remembered((self.upstream_key, *key))
        ):
            raise Remembered(subject, f"upstream said {key[-1]} does not exist in {key[1]} (remembered)")

    async def _remember_missing(self, key: tuple[str, ...], exc: BaseException) -> None:
        if isinstance(exc, UpstreamNotFound):
            self.negative.add(key)
            if self.cluster is not None:
                await self.cluster.remember((self.upstream_key, *key), self.negative.ttl)

    def _count(self, exc: BaseException) -> None:
        if isinstance(exc, _BREAKER_FAILURES):
            self.breaker.failure()
            if self.sources is not None:
                self.sources.far(self.client)
        elif isinstance(exc, RegistryClientError):
            self.breaker.success()  # a 404 or 401 is an answer: the upstream is up

    def _in_background(self, key: tuple[str, ...], work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` once per ``key`` at a time, owned by the proxy (cancelled at shutdown)."""
        if key in self._background:
            work.close()
            return
        task = asyncio.get_running_loop().create_task(work, name=" ".join(key))
        self._background[key] = task
        task.add_done_callback(lambda _: self._background.pop(key, None))

    # -- pass-through --------------------------------------------------------------------------------------

    async def tags(self, repo: str, query: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        try:
            async with self._upstream("tags"), asyncio.timeout(self.manifest_timeout):
                return await self.client.raw_get(
                    f"/v2/{repo}/tags/list", scope=f"repository:{repo}:pull", params=query or None
                )
        except TimeoutError as exc:
            raise UpstreamDown("upstream registry timed out") from exc
        except (RegistryClientError, CircuitOpen) as exc:
            raise upstream_error(exc, "repository") from exc

    async def aclose(self) -> None:
        for task in list(self._background.values()):
            task.cancel()
        await asyncio.gather(*self._background.values(), return_exceptions=True)

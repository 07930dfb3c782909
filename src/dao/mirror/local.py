"""The local accelerator (``dao mirror serve --local``): the mirror on a host's loopback, the engine's first
registry mirror, whose fetches read each blob from every source at once.

- **Sources** of a blob (:class:`LocalSources`): the user's accelerators (``--via``, Docker Hub images only:
  a mirror serves Docker Hub), the peers (``--peer``: other hosts' local accelerators) and the registry
  itself. Peers and accelerators are *mirrors* to the transfer (:func:`dao.transfer.sources.pick`): chunks go
  to the fastest of them, and the registry is asked only for what none of them can serve, so the user's
  hosts together fetch each blob from the upstream once.
- **Checks**: the transfer hashes the whole blob (``Job(verify=True)``) and, when it does not match, finds
  whose bytes were wrong by comparing them with another source's (:mod:`dao.transfer.verify`); a peer caught
  lying is dropped, and left out of every later fetch. The engine reads the blob while it arrives, held one
  byte short until the digest checks; when bytes were replaced, its connection is cut and it asks again.
- **Serving peers** (``--peer-listen``): a listener of its own that serves only committed blobs, by digest,
  to requests signed with the user's peer secret (:class:`~dao.mirror.signing.Signer`); never a blob being
  fetched (two peers each waiting on the other's fetch would wait for ever), never a manifest, never a tag.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from dao import __version__
from dao.mirror.nodes import signed_get
from dao.mirror.serve import send_stored
from dao.mirror.signing import Signer
from dao.mirror.storage.base import BlobIngester
from dao.oci.digest import Digest, DigestError
from dao.oci.errors import RegistryError
from dao.oci.reference import DOCKER_HUB_DOMAIN
from dao.registry.client import RegistryClient
from dao.registry.errors import RegistryClientError
from dao.transfer.sources import Body, Peer

if TYPE_CHECKING:
    from dao.mirror.proxy import Proxy

log = logging.getLogger("dao.mirror")

PEER_HEADER = "X-Dao-Peer"
PEER_PATH = "/_dao/peer/blobs/"
INFO_PATH = "/_dao/local"  # what dao pull asks to learn that the engine's mirror is a local accelerator
PREFETCH_CLIENT = "prefetch"  # the fetch gate's name for the prefetches (their own per-client share)
PREFETCH_WINDOW = 4  # blobs of one image fetched ahead at once from near sources (the engine's come on top)
NEAR_SECONDS = 0.015  # an answer from upstream faster than this: the sources are near (loopback, a LAN)
ROUND_TRIPS = 8  # answers from each upstream whose quickest says how near it is
REMEMBERED = 64  # recent fetches whose sources are looked at for liars and speeds


def peer_signer(secret: str) -> Signer:
    return Signer(secret, "peer blob")


class PeerSource:
    """A blob at another host's local accelerator."""

    def __init__(self, session: aiohttp.ClientSession, url: str, signer: Signer, digest: Digest) -> None:
        self.session, self.url, self.signer, self.digest = session, url, signer, digest

    def open(self, start: int = 0, end: int | None = None) -> AbstractAsyncContextManager[Body]:
        headers = {PEER_HEADER: self.signer.sign(self.digest)}
        return signed_get(self.session, f"{self.url}{PEER_PATH}{self.digest}", headers, start, end, "peer")


class LocalSources:
    """Every source of a blob, as fresh :class:`Peer` views for one fetch. What the fetches learnt carries
    over: a source caught sending bad bytes is left out from then on, and the speed each one measured ranks
    it in the next fetch."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        vias: list[RegistryClient],
        peers: list[str],
        signer: Signer | None,
        hub: RegistryClient | None = None,
        peers_file: Path | None = None,
        step_aside: bool = True,
    ) -> None:
        """``hub``: Docker Hub itself, when the proxy's client for it is the first accelerator (``vias``);
        ``peers_file``: more peers, a JSON list of URLs, read again when it changes; ``step_aside``: see
        :meth:`aside`."""
        self.session, self.vias, self.signer, self.hub = session, vias, signer, hub
        self.given, self.peers = peers, list(peers)
        self.peers_file = peers_file
        self._read: float | None = None  # the peers file's mtime when it was last read
        self.liars: dict[str, str] = {}  # url -> why
        self.rates: dict[str, float] = {}
        self.round_trips: dict[str, collections.deque[float]] = {}  # upstream URL -> its latest answers' times
        self.step_aside = step_aside
        self._recent: collections.deque[list[Peer]] = collections.deque(maxlen=REMEMBERED)

    def __call__(self, registry: RegistryClient, registry_name: str, repo: str, digest: Digest) -> list[Peer]:
        """The sources of ``digest`` in ``repo``: accelerators (for Docker Hub), peers, then ``registry``."""
        self._learn()
        self._reread()
        views: list[Peer] = []
        if registry_name == DOCKER_HUB_DOMAIN:
            registry = self.hub or registry
            for via in self.vias:
                views.append(Peer(via.base_url, lambda _, c=via: c.blob_source(repo, digest), mirror=True))
        if self.signer is not None:
            for url in self.peers:
                source = PeerSource(self.session, url, self.signer, digest)
                views.append(Peer(url, lambda _, s=source: s, mirror=True))
        views.append(Peer(registry.base_url, lambda _: registry.blob_source(repo, digest)))
        views = [v for v in views if v.url not in self.liars]
        for rank, view in enumerate(views):
            view.rank, view.rate = rank, self.rates.get(view.url)
        self._recent.append(views)
        return views

    def prefetch_window(self, upstream: RegistryClient, cache: str, seconds: float) -> int | None:
        """How many blobs of an image to fetch ahead at once (None: all; 0: none, the engine reads them from
        ``upstream`` itself, see :meth:`aside`), from how long its manifest took (``cache``: where it came
        from; only a round trip to upstream says how far the sources are).

        Near sources are limited by this host's cores, not the link: a few at a time in the engine's order
        gets it its first layers soonest. Over a long link each connection is held to a share of it by the
        round trip (and loss), so every blob at once moves the most bytes (on the lossy link, 12 layers of
        2 MiB: 11.6 s four at a time, 8.1 s all at once)."""
        if cache in ("miss", "revalidated"):
            self.observe(upstream, seconds)
        near = self.near(upstream)
        log.debug("prefetch: the manifest took %.4f s (%s): %s", seconds, cache, "near" if near else "far")
        if self.stepping_aside(upstream):
            return 0
        return PREFETCH_WINDOW if near else None

    def observe(self, upstream: RegistryClient, seconds: float) -> None:
        """An answer from ``upstream`` took ``seconds``: at least one round trip to it."""
        self.round_trips.setdefault(upstream.base_url, collections.deque(maxlen=ROUND_TRIPS)).append(seconds)

    def near(self, upstream: RegistryClient) -> bool:
        """Whether ``upstream`` answered as fast as this host's loopback lately. The quickest of its latest
        answers says it: each is one round trip or more, plus the time both ends' code took, which is what
        varies (a fresh process's first request, a busy host)."""
        seconds = self.round_trips.get(upstream.base_url)
        return bool(seconds) and min(seconds) < NEAR_SECONDS

    def far(self, upstream: RegistryClient) -> None:
        """``upstream`` failed us: near no more until its answers say so again."""
        self.round_trips.pop(upstream.base_url, None)

    async def measure(self, upstream: RegistryClient, times: int = 2) -> None:
        """Time a few ``GET /v2/`` to ``upstream`` (the start: it is how near the first pull's sources are,
        and the connection is then open for it)."""
        for _ in range(times):
            began = time.monotonic()
            try:
                answer = await upstream.ping()
            except (RegistryClientError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.debug("round trip to %s: %s", upstream.base_url, exc)
                return
            if answer.status >= 500:  # quick, but not a source to send the engine to
                return
            self.observe(upstream, time.monotonic() - began)

    def aside(self, upstream: RegistryClient, repo: str, digest: Digest) -> str | None:
        """Where the engine should read a blob this host neither holds nor fetches, itself (None: from us).

        When ``upstream`` (the accelerator manifests come from, or the registry) is as near as this host's
        loopback and anonymous, a hop through here only adds work for the same cores: the engine read a
        400 MiB layer from a mirror on loopback in 1.1 s straight and in 1.4-1.7 s through us, while we
        received, hashed and wrote the same bytes. The engine checks the digest itself and nothing enters
        our cache, so nothing here can go wrong from the bytes; a source that fails sends us back to
        fetching (:meth:`far`), and the engine to its next mirror."""
        return upstream.open_blob_url(repo, digest) if self.stepping_aside(upstream) else None

    def stepping_aside(self, upstream: RegistryClient) -> bool:
        """Whether the engine reads ``upstream``'s blobs itself (see :meth:`aside`): the one test for both the
        redirect and the prefetch it makes needless."""
        return self.step_aside and self.near(upstream) and upstream.open_to_others

    def _reread(self) -> None:
        if self.peers_file is None:
            return
        try:
            mtime = self.peers_file.stat().st_mtime
            if mtime == self._read:
                return
            found = json.loads(self.peers_file.read_text())
        except FileNotFoundError:
            found = []
            mtime = None
        except (OSError, ValueError) as exc:
            log.warning("cannot read the peers file %s (%s): keeping the peers it named", self.peers_file, exc)
            return
        urls = [u.rstrip("/") for u in found if isinstance(u, str) and u.startswith(("http://", "https://"))]
        self.peers = list(dict.fromkeys([*self.given, *urls]))
        self._read = mtime
        log.info("peers: %s", ", ".join(self.peers) or "none")

    def _learn(self) -> None:
        for views in self._recent:
            for view in views:
                if view.lied and view.out is not None:
                    self.liars.setdefault(view.url, view.out)
                elif view.rate is not None:
                    self.rates[view.url] = view.rate


async def prefetch_blobs(proxy: Proxy, repo: str, manifest: bytes, window: int | None = PREFETCH_WINDOW) -> None:
    """Every blob of an image manifest the engine was just given, fetched ahead of its requests: the engine
    asks for three layers at a time, and on a long link each first request is a round trip it would wait
    for. The fetches run on with nobody reading (see ``Fetch.keep``); the engine's requests join them.

    In the manifest's order, ``window`` at a time (None: all at once): the engine unpacks the layers in that
    order, so the first ones are what it waits for; all of them at once share this host's cores evenly, and
    on loopback held the first layer back until almost every byte of the image was in. (See
    :meth:`LocalSources.prefetch_window`.)"""
    try:
        doc = json.loads(manifest)
        named = [doc["config"], *doc.get("layers", [])]
        digests = list(dict.fromkeys(Digest.parse(str(d["digest"])) for d in named))
    except (ValueError, KeyError, TypeError, DigestError):
        return

    slots = asyncio.Semaphore(window or len(digests))  # its waiters go in the order they came: the manifest's

    async def one(digest: Digest) -> None:
        async with slots:
            try:
                answer = await proxy.open_blob(repo, digest, client=PREFETCH_CLIENT)
            except Exception as exc:  # the engine's own request says what went wrong, if it still matters
                log.debug("prefetch of %s: %s", digest, exc)
                return
            if answer.local is not None:
                answer.local.close()
            elif answer.fetch is not None:
                fetch, task = answer.fetch, answer.fetch.task
                fetch.keep = True
                fetch.release()
                if task is not None:
                    await asyncio.wait([task])  # its end (an error is its readers' to report)

    await asyncio.gather(*(one(d) for d in digests))


def peer_app(store: BlobIngester, signer: Signer) -> web.Application:
    """The peer listener: committed blobs by digest, to signed requests only."""

    async def blob(request: web.Request) -> web.StreamResponse:
        try:
            digest = Digest.parse(request.match_info["digest"])
        except DigestError:
            raise web.HTTPBadRequest(text="not a digest\n") from None
        if not signer.signed(digest, request.headers.get(PEER_HEADER)):
            raise web.HTTPForbidden(text="not a peer of this host's user\n")
        try:
            return await send_stored(request, digest, store)
        except RegistryError as exc:  # a Range it cannot serve
            raise web.HTTPRequestRangeNotSatisfiable(text=f"{exc.message}\n") from None

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_route("GET", PEER_PATH + "{digest}", blob)
    app.router.add_route("GET", "/healthz", healthz)
    return app


def add_info(app: web.Application, sources: LocalSources) -> None:
    """``GET /_dao/local``: this is a local accelerator (``dao pull`` then lets the engine pull through it)."""

    async def info(request: web.Request) -> web.Response:
        body: dict[str, Any] = {
            "local": True,
            "version": __version__,
            "via": [v.base_url for v in sources.vias],
            "peers": len(sources.peers),  # as the peers file says now
        }
        return web.json_response(body)

    app.router.add_route("GET", INFO_PATH, info)

"""The mirror as a daemon: the stores, the accounts, the proxies and their shared fetches, the cache's
collector, built from one :class:`~dao.config.MirrorConfig`, served until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from dao.config import ConfigError, MirrorConfig, parse_listen
from dao.mirror.accounts import Accounts
from dao.mirror.app import Check, make_app
from dao.mirror.availability import CircuitBreaker
from dao.mirror.eviction import Collector, collecting
from dao.mirror.guard import ConnectionGuard, GuardedRunner
from dao.mirror.inflight import FetchGate, Inflight
from dao.mirror.local import LocalSources, add_info, peer_app, peer_signer
from dao.mirror.logs import AccessLogger
from dao.mirror.metrics import Metrics
from dao.mirror.proxies import Proxies
from dao.mirror.proxy import Proxy
from dao.mirror.routing import Router
from dao.mirror.serve import SendPolicy
from dao.mirror.storage import FilesystemBlobStore, FilesystemManifestStore, FilesystemOrigins
from dao.mirror.usage import Meter
from dao.oci.reference import DOCKER_HUB_DOMAIN
from dao.registry.client import RegistryClient
from dao.registry.credentials import Credentials
from dao.transfer.download import upstream_policy
from dao.units import parse_size

if TYPE_CHECKING:
    from dao.mirror.cluster import Cluster

log = logging.getLogger("dao.mirror")
LOCAL_CONNECTIONS_PER_HOST = 24
# The local accelerator's sources are the user's own accelerators and peers, which expect many connections
# (dao pull starts with 16 to the same ones, and splits a running chunk for an idle connection near the end);
# a mirror's upstream is someone else's registry: 6 to start, and no byte fetched twice.
LOCAL_START_CONNECTIONS = 16
access_log = logging.getLogger("dao.mirror.access")


async def serve(config: MirrorConfig, *, ready: asyncio.Event | None = None) -> None:
    """Run the mirror until SIGTERM/SIGINT; a clean stop cancels fetches (their spool files are removed)."""
    async with contextlib.AsyncExitStack() as stack:
        await _serve(config, stack, ready)


Stores = tuple[FilesystemBlobStore, FilesystemManifestStore, FilesystemOrigins, list[Check]]


async def _stores(config: MirrorConfig, stack: contextlib.AsyncExitStack) -> Stores:
    """The data directory alone, or (``storage = s3://...``) the bucket under it; and what ``/readyz`` asks."""
    if not config.storage:
        if config.redirect:
            raise ConfigError("redirect needs storage = s3://...: a redirect points into the bucket")
        root = config.data_dir
        return FilesystemBlobStore(root), FilesystemManifestStore(root), FilesystemOrigins(root), []
    try:
        from dao.mirror.storage import bucket as s3b
        from dao.mirror.storage import s3
    except ImportError:
        raise ConfigError("storage = s3://... needs the S3 client: pip install 'dao[s3]'") from None
    try:
        bucket = await stack.enter_async_context(s3b.bucket_of(config))
        await bucket.check()
    except s3b.BucketError as exc:
        raise ConfigError(exc.message) from None
    log.info(
        "storage: bucket %s (prefix %r) at %s", bucket.location.bucket, bucket.location.prefix, bucket.endpoint_url
    )
    root = config.data_dir
    blobs = s3.TieredBlobStore(root, bucket, redirect=config.redirect, redirect_base=config.redirect_base)
    manifests = s3.TieredManifestStore(root, bucket, config.manifest_ttl)
    return blobs, manifests, s3.TieredOrigins(root, bucket), [bucket.status]


async def _cluster(config: MirrorConfig, stack: contextlib.AsyncExitStack) -> Cluster | None:
    if not config.redis:
        return None
    try:
        from dao.mirror.cluster import Cluster, ClusterError
    except ImportError:
        raise ConfigError("redis = ... needs the Redis client: pip install 'dao[cluster]'") from None
    try:
        cluster = Cluster(config.redis, config.node_url, config.cluster_secret, lease_ttl=config.lease_ttl)
    except (ClusterError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    stack.push_async_callback(cluster.aclose)
    why = await cluster.check()
    log.info("cluster: redis %s, this node at %s%s", config.redis, config.node_url, f" ({why})" if why else "")
    return cluster


async def _serve(config: MirrorConfig, stack: contextlib.AsyncExitStack, ready: asyncio.Event | None) -> None:
    blobs, manifests, origins, checks = await _stores(config, stack)
    cluster = await _cluster(config, stack)
    if cluster is not None:
        checks.append(cluster.check)
    leftovers = blobs.clean_spool()
    if leftovers:
        log.info("removed %d partial downloads left by an earlier run", leftovers)
    try:
        router = Router(
            docker_hub=config.via[0] if config.via else config.upstream,
            registries=config.registries,
            aliases=config.aliases,
            hosts=config.hosts,
            allow=config.allow,
            deny=config.deny,
        )
        default_quota = parse_size(config.default_quota)
        min_send_rate = parse_size(config.min_send_rate)
        collector = Collector(
            blobs,
            manifests,
            origins,
            max_bytes=parse_size(config.cache_limit),
            min_free=parse_size(config.cache_min_free),
        )
        accounts = Accounts(config.database_url)
    except ValueError as exc:  # AccountError included
        raise ConfigError(str(exc)) from exc
    unaddressed = [u.id for u in accounts.users() if u.address is None]
    if config.mirror_domain and unaddressed:
        log.warning(
            "%d users have no secret address yet, so only their tokens identify them (%s): "
            "dao mirror users reissue ID --address",
            len(unaddressed),
            ", ".join(unaddressed[:10]),
        )
    metrics = Metrics()
    bucket = getattr(blobs, "bucket", None)
    if bucket is not None:
        bucket.on_request = lambda op: metrics.bucket_requests.labels(op).inc()
    if cluster is not None:
        cluster.on_call = lambda what: metrics.redis_calls.labels(what).inc()
    inflight = Inflight(
        blobs,
        upstream_policy(
            config.fetch_connections,
            int(config.fetch_split_mib * 1024 * 1024),
            **(
                {"connections": min(LOCAL_START_CONNECTIONS, config.fetch_connections), "split": True}
                if config.local
                else {}
            ),
        ),
        FetchGate(config.max_fetches, config.max_fetches_per_client),
        on_end=cluster.release if cluster is not None else None,
    )
    # The local accelerator shares its address with the host's other clients of the same accelerators (a
    # mirror allows 64 connections per address): fewer of its own, even while it prefetches a whole image.
    per_host = LOCAL_CONNECTIONS_PER_HOST if config.local else 64
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=per_host, ttl_dns_cache=300)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        hub_credentials = None
        if config.upstream_username:
            hub_credentials = Credentials(config.upstream_username, config.upstream_password)
        sources = local_sources(config, session, hub_credentials) if config.local else None

        def make_proxy(registry: str) -> Proxy:
            upstream = router.upstream(registry)
            hub = registry == DOCKER_HUB_DOMAIN and not config.via
            client = RegistryClient(upstream, session, credentials=hub_credentials if hub else None)
            return Proxy(
                client,
                blobs,
                manifests,
                manifest_ttl=config.manifest_ttl,
                manifest_timeout=config.manifest_timeout,
                manifest_swr=config.manifest_swr,
                negative_ttl=config.negative_ttl,
                breaker=CircuitBreaker(upstream, threshold=config.breaker_failures, cooldown=config.breaker_cooldown),
                prefetch_children=config.prefetch_children,
                inflight=inflight,
                metrics=metrics,
                registry=registry,
                origins=origins,
                allowed=router.allows,
                cluster=cluster,
                sources=sources,
            )

        meter = Meter(
            accounts,
            domain=config.mirror_domain,
            anonymous=config.anonymous,
            default_quota=default_quota,
            flush_interval=config.usage_flush,
            live=cluster,
        )
        guard = ConnectionGuard(config.max_connections_per_client, config.header_timeout)
        send = SendPolicy(config.send_timeout, float(min_send_rate))
        proxies = Proxies(make_proxy, inflight)
        app = make_app(router, proxies, metrics, meter, guard, send, cluster=cluster, checks=checks)
        if sources is not None:
            add_info(app, sources)
            app.cleanup_ctx.append(functools.partial(_measuring, sources, proxies.get(DOCKER_HUB_DOMAIN)))
        app.cleanup_ctx.append(functools.partial(collecting, collector, metrics.evictions.inc, config.gc_interval))
        runner = GuardedRunner(
            guard,
            app,
            access_log_class=AccessLogger,
            access_log=access_log if config.access_log else None,
            handle_signals=False,
        )
        await runner.setup()
        host, port = config.listen_address
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        if sources is not None and sources.signer is not None and config.peer_listen:
            await _serve_peers(config.peer_listen, peer_app(blobs, sources.signer), stack)
        log.info(
            "dao mirror%s listening on %s, upstream %s, data in %s",
            " (local accelerator)" if config.local else "",
            config.listen,
            ", ".join((*config.via, config.upstream)),
            config.data_dir,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready.set()
        try:
            await stop.wait()
        finally:
            log.info("dao mirror stopping")
            await runner.cleanup()


async def _measuring(sources: LocalSources, hub: Proxy, app: web.Application) -> AsyncIterator[None]:
    """How near the local accelerator's Docker Hub source is, measured as it starts (see ``LocalSources.near``)."""
    task = asyncio.create_task(sources.measure(hub.client))
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def local_sources(
    config: MirrorConfig, session: aiohttp.ClientSession, hub_credentials: Credentials | None
) -> LocalSources:
    """The local accelerator's sources: ``--via`` accelerators, ``--peer`` hosts, the registry itself."""
    vias = [RegistryClient(url, session) for url in config.via]
    hub = RegistryClient(config.upstream, session, credentials=hub_credentials) if vias else None
    signer = peer_signer(config.peer_secret) if config.peer_secret else None
    peers_file = Path(config.peers_file) if config.peers_file else None
    peers = [u.rstrip("/") for u in config.peer]
    return LocalSources(session, vias, peers, signer, hub, peers_file, step_aside=config.step_aside)


async def _serve_peers(listen: str, app: web.Application, stack: contextlib.AsyncExitStack) -> None:
    """The peer listener (see :mod:`dao.mirror.local`): only committed blobs, to signed requests."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    host, port = parse_listen(listen)
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    log.info("serving cached blobs to peers on %s", listen)

"""The mirror's HTTP boundary: Registry API V2 read routes, the middlewares, and the one place errors
become OCI codes.

Handlers validate the request and ask :class:`~dao.mirror.proxy.Proxy`; the proxy, the router and the meter
raise :class:`~dao.mirror.errors.MirrorError`, which :func:`wire` turns into the OCI error (code, status,
headers) and the middleware into the JSON body. Write methods are refused with ``UNSUPPORTED``: a
pull-through cache does not accept pushes. The daemon that serves this app is :mod:`.daemon`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from dao.mirror.errors import (
    BadDigest,
    BadName,
    Busy,
    Denied,
    MirrorError,
    NotAuthenticated,
    NotFound,
    NotProxied,
    QuotaUsed,
    UpstreamBroken,
    UpstreamDown,
    UpstreamLimited,
    UpstreamRefused,
)
from dao.mirror.guard import GUARD_KEY, ConnectionGuard
from dao.mirror.guard import middleware as guard_middleware
from dao.mirror.inflight import FetchFailed
from dao.mirror.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from dao.mirror.metrics import Metrics
from dao.mirror.nodes import NODE_HEADER
from dao.mirror.proxies import Proxies
from dao.mirror.proxy import STALE_WARNING, Proxy
from dao.mirror.routing import Router
from dao.mirror.serve import (
    SEND_POLICY_KEY,
    SendPolicy,
    Wanted,
    blob_headers,
    parse_range,
    send_fetch,
    send_local,
    send_stored,
)
from dao.mirror.state import state
from dao.mirror.usage import Meter
from dao.oci.digest import Digest, DigestError
from dao.oci.errors import ErrorCode, RegistryError
from dao.oci.manifest import parse_accept
from dao.oci.reference import is_valid_tag
from dao.registry.client import NAMESPACES_HEADER

log = logging.getLogger("dao.mirror")
access_log = logging.getLogger("dao.mirror.access")

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")
PROXIES_KEY = web.AppKey("proxies", Proxies)
METRICS_KEY = web.AppKey("metrics", Metrics)
METER_KEY = web.AppKey("meter", Meter)
ROUTER_KEY = web.AppKey("router", Router)
CLUSTER_KEY = web.AppKey("cluster", Any)  # a dao.mirror.cluster.Cluster (``--redis``), absent otherwise
Check = Callable[[], Awaitable[str | None]]  # None: fine; else what this node lacks (said by /readyz)
CHECKS_KEY = web.AppKey("checks", list[Check])

# Greedy name: the last /manifests/, /blobs/ or /tags/ splits it (tags and digests hold no '/').
_ROUTE = re.compile(r"(?P<name>.+)/(?P<kind>manifests|blobs|tags)/(?P<rest>[^/]+)")
_UPLOAD = re.compile(r".+/blobs/uploads(?:/.*)?")
_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@web.middleware
async def measure(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every request (outermost, so it sees the status the error dispatcher chose) and its bytes."""
    metrics = request.app[METRICS_KEY]
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics.requests.labels(state(request).route, request.method, str(status)).inc()
        metrics.served(state(request).cache, state(request).sent or 0)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except MirrorError as exc:
        state(request).failure = exc.message
        if exc.cache is not None:
            state(request).cache = exc.cache
        return error_response(wire(exc))
    except RegistryError as exc:
        state(request).failure = exc.message
        return error_response(exc)
    except web.HTTPException:
        raise
    except ConnectionError:
        # The client hung up mid-response (a pull cancelled, a chunk raced and lost): routine, not a fault.
        # 499 is what the access log and /metrics show, as nginx does; nothing more can be sent anyway.
        state(request).failure = "client went away"
        return web.Response(status=499)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(RegistryError(ErrorCode.UNKNOWN, "internal error in the mirror"))


def error_response(exc: RegistryError) -> web.Response:
    return web.Response(status=exc.status, body=exc.body(), content_type="application/json", headers=exc.headers)


_NOT_FOUND = {
    "blob": ErrorCode.BLOB_UNKNOWN,
    "manifest": ErrorCode.MANIFEST_UNKNOWN,
    "repository": ErrorCode.NAME_UNKNOWN,
}


def wire(exc: MirrorError) -> RegistryError:
    """What a client sees for each of the mirror's errors: the one table."""
    retry = {"Retry-After": f"{exc.retry_after:.0f}"} if exc.retry_after is not None else None
    match exc:
        case NotFound():
            return RegistryError(_NOT_FOUND[exc.subject], exc.message)
        case NotProxied():
            return RegistryError(ErrorCode.NAME_UNKNOWN, exc.message, status=404)
        case BadDigest():
            return RegistryError(ErrorCode.DIGEST_INVALID, exc.message)
        case BadName():
            return RegistryError(ErrorCode.NAME_INVALID, exc.message)
        case Denied() | UpstreamRefused():
            # An upstream refusal is never a 401 of our own: the client would look for a challenge we do not issue.
            return RegistryError(ErrorCode.DENIED, exc.message)
        case Busy() | QuotaUsed() | UpstreamLimited():
            return RegistryError(ErrorCode.TOOMANYREQUESTS, exc.message, headers=retry)
        case NotAuthenticated():
            return RegistryError(
                ErrorCode.UNAUTHORIZED, exc.message, headers={"WWW-Authenticate": 'Basic realm="dao mirror"'}
            )
        case UpstreamDown():
            return RegistryError(ErrorCode.UNAVAILABLE, exc.message, headers=retry)
        case UpstreamBroken():
            return RegistryError(ErrorCode.UPSTREAM_ERROR, exc.message, status=502)
    return RegistryError(ErrorCode.UNKNOWN, exc.message)


@web.middleware
async def account(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Name the user, refuse them when over quota, and count what they got (inside ``errors``, so the quota
    refusal is an OCI error like any other)."""
    meter = request.app[METER_KEY]
    if not request.path.startswith("/v2"):
        return await handler(request)
    user = meter.identify(request.headers.get("Host"), request.headers.get("Authorization"))
    state(request).user = user
    state(request).user_name = meter.name_of(user)
    route = request.path != "/v2" and request.path != "/v2/"
    if route:
        meter.check(user)
    completed = False
    try:
        response = await handler(request)
        redirected = state(request).cache in ("redirect", "aside")  # sent from elsewhere: a download all the same
        completed = (response.status < 300 or redirected) and request.method == "GET" and state(request).failure is None
        return response
    finally:
        kind = state(request).route
        meter.record(
            user,
            sent=state(request).sent or 0,
            blob=completed and kind == "blobs",
            pull=completed and kind == "manifests",
            hit=state(request).cache == "hit",
        )


async def _api_version(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault(*API_VERSION_HEADER)
    response.headers["X-Content-Type-Options"] = "nosniff"  # a manifest or blob is never a page to render


async def base(request: web.Request) -> web.StreamResponse:
    state(request).route = "base"
    # Tells dao pull this mirror answers for the registry a request names with ?ns=, not only Docker Hub.
    return web.json_response({}, headers={NAMESPACES_HEADER: "true"})


async def metrics_endpoint(request: web.Request) -> web.StreamResponse:
    state(request).route = "metrics"
    return web.Response(body=request.app[METRICS_KEY].render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def healthz(request: web.Request) -> web.StreamResponse:
    """Alive: the process answers HTTP."""
    state(request).route = "health"
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.StreamResponse:
    """Ready: the cache directory can take new blobs (exists, writable); otherwise 503 so a balancer skips us.

    A node whose Redis or bucket is down still serves (alone, or from its disk and the upstream): 200, and
    the body says what it lacks."""
    state(request).route = "health"
    spool = request.app[PROXIES_KEY].inflight.store.spool_dir()
    if not os.access(spool, os.W_OK | os.X_OK):
        return web.Response(status=503, text=f"cache directory {spool} is not writable\n")
    lacking = [why for check in request.app[CHECKS_KEY] if (why := await check()) is not None]
    return web.Response(text="".join(f"degraded: {why}\n" for why in lacking) or "ok\n")


async def node_blob(request: web.Request) -> web.StreamResponse:
    """A blob this node fetches (or has), for another node of its cluster: from the spool file as it grows,
    so the other node's clients get the bytes as soon as ours do. Only for requests signed with the cluster
    secret; never counted as anyone's usage (the node the client reached counts it)."""
    state(request).route = "node"
    cluster = request.app.get(CLUSTER_KEY)
    digest = _digest(request.match_info["digest"])
    if cluster is None or not cluster.signed(digest, request.headers.get(NODE_HEADER)):
        raise web.HTTPForbidden(text="not a node of this cluster\n")
    inflight = request.app[PROXIES_KEY].inflight
    fetch = inflight.get(digest)
    if fetch is not None:
        try:
            fetch.acquire()
        except FetchFailed:
            fetch = None
    if fetch is not None:
        try:
            await asyncio.shield(fetch.headers_ready)
            wanted = parse_range(request.headers.get("Range"), fetch.size)
        except BaseException:
            fetch.release()
            raise web.HTTPNotFound(text="the fetch failed\n") from None
        state(request).cache = "join"
        return await send_fetch(request, digest, fetch, wanted)
    return await send_stored(request, digest, inflight.store)


async def dispatch(request: web.Request) -> web.StreamResponse:
    path = request.match_info["tail"]
    if request.method in _WRITE_METHODS or _UPLOAD.fullmatch(path):
        raise RegistryError(ErrorCode.UNSUPPORTED, "this registry is a read-only pull-through mirror")
    match = _ROUTE.fullmatch(path)
    if match is None:
        raise RegistryError(ErrorCode.NAME_UNKNOWN, "no such route", status=404)
    route = request.app[ROUTER_KEY].route(request.headers.get("Host"), request.query.get("ns"), match["name"])
    name = route.repository
    state(request).registry = route.registry
    proxy = request.app[PROXIES_KEY].get(route.registry)
    kind, rest = match["kind"], match["rest"]
    state(request).route = kind
    if kind == "manifests":
        return await manifest(request, proxy, name, rest)
    if kind == "blobs":
        return await blob(request, proxy, name, _digest(rest))
    if rest != "list":
        raise RegistryError(ErrorCode.NAME_UNKNOWN, "no such route", status=404)
    query = {k: v for k, v in request.query.items() if k != "ns"}
    status, headers, body = await proxy.tags(name, query)
    return web.Response(status=status, body=body, headers=headers)


def _digest(text: str) -> Digest:
    try:
        return Digest.parse(text)
    except DigestError as exc:
        raise RegistryError(ErrorCode.DIGEST_INVALID, str(exc)) from exc


async def manifest(request: web.Request, proxy: Proxy, name: str, reference: str) -> web.StreamResponse:
    if ":" in reference:
        _digest(reference)
    elif not is_valid_tag(reference):
        raise RegistryError(ErrorCode.TAG_INVALID, f"invalid tag: {reference[:200]!r}")
    answer = await proxy.manifest(name, reference, parse_accept(request.headers.getall("Accept", [])))
    state(request).cache = answer.cache
    headers = {
        "Docker-Content-Digest": str(answer.digest),
        "ETag": f'"{answer.digest}"',
        "Content-Type": answer.media_type,
    }
    if answer.stale:
        headers["Warning"] = STALE_WARNING
    if request.method == "GET":
        state(request).sent = len(answer.body)
    return web.Response(body=answer.body, headers=headers)  # aiohttp drops the body of a HEAD answer


async def blob(request: web.Request, proxy: Proxy, name: str, digest: Digest) -> web.StreamResponse:
    if request.method == "HEAD" and "Range" not in request.headers:
        size, cache = await proxy.stat_blob(name, digest)
        state(request).cache = cache
        resp = web.StreamResponse()
        blob_headers(resp, digest)
        if size is not None:
            resp.content_length = size
        await resp.prepare(request)
        await resp.write_eof()
        return resp
    answer = await proxy.open_blob(name, digest, request.remote or "")
    state(request).cache = answer.cache
    try:
        wanted = parse_range(request.headers.get("Range"), answer.size)  # once: for the quota and the answer
        held = _reserve(request, answer.size, wanted)
    except (MirrorError, RegistryError):
        if answer.local is not None:
            answer.local.close()
        elif answer.fetch is not None:
            answer.fetch.release()
        raise
    try:
        if answer.redirect is not None:
            # The bucket (or its CDN) sends the bytes, counted as sent as if from here; or (``aside``) the local
            # accelerator's near source does, whose size we do not know.
            state(request).sent = held or (answer.size or 0)
            resp = web.Response(status=307, headers={"Location": answer.redirect})
            blob_headers(resp, digest)
            return resp
        if answer.local is not None:
            return await send_local(request, digest, answer.local, wanted)
        assert answer.fetch is not None
        return await send_fetch(request, digest, answer.fetch, wanted)
    finally:
        if held:
            request.app[METER_KEY].release(state(request).user, held)


def _reserve(request: web.Request, size: int | None, wanted: Wanted) -> int:
    """Hold the bytes this response will send against the user's quota (raises QuotaUsed when that is used
    up); returns what was held, for the caller to release."""
    user = state(request).user
    if user is None or size is None:
        return 0
    count = size if wanted is None else (wanted[1] if wanted[1] is not None else size - 1) - wanted[0] + 1
    request.app[METER_KEY].reserve(user, count)
    return count


def make_app(
    router: Router,
    proxies: Proxies,
    metrics: Metrics,
    meter: Meter,
    guard: ConnectionGuard | None = None,
    send: SendPolicy | None = None,
    *,
    cluster: Any = None,
    checks: list[Check] | None = None,
) -> web.Application:
    """``cluster``: the node's :class:`~dao.mirror.cluster.Cluster` (serves ``/_dao/blobs/``); ``checks``:
    what ``/readyz`` asks (Redis, the bucket)."""
    app = web.Application(
        middlewares=[guard_middleware, measure, errors, account],
        handler_args={"max_field_size": 8190, "max_line_size": 8190},
    )
    if guard is not None:
        app[GUARD_KEY] = guard
    app[SEND_POLICY_KEY] = send or SendPolicy()
    app[METER_KEY] = meter
    app[ROUTER_KEY] = router
    app[PROXIES_KEY] = proxies
    app[METRICS_KEY] = metrics
    app[CHECKS_KEY] = checks or []
    if cluster is not None:
        app[CLUSTER_KEY] = cluster
    metrics.watch(lambda: len(proxies.inflight), proxies.states)
    app.router.add_route("GET", "/v2", base)
    app.router.add_route("GET", "/v2/", base)
    app.router.add_route("*", "/v2/{tail:.+}", dispatch)
    app.router.add_route("GET", "/metrics", metrics_endpoint)
    app.router.add_route("GET", "/healthz", healthz)
    app.router.add_route("GET", "/readyz", readyz)
    app.router.add_route("GET", "/_dao/blobs/{digest}", node_blob)
    app.on_response_prepare.append(_api_version)

    async def close_proxy(app: web.Application) -> None:
        await proxies.aclose()

    async def metering(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(meter.run(), name="usage meter")
        yield
        task.cancel()  # its last act is a final flush
        await asyncio.gather(task, return_exceptions=True)

    app.on_shutdown.append(close_proxy)
    app.cleanup_ctx.append(metering)
    return app

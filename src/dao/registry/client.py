"""An asyncio client for the Registry HTTP API V2 (OCI distribution spec), read side.

Every request goes through :meth:`RegistryClient._send`: authorization (with one retry after a challenge),
redirects followed by hand so ``Authorization`` never reaches another host (Docker Hub redirects blobs to a
CDN), retries with exponential backoff and jitter on connection errors, 429 and 5xx for idempotent methods,
and one place (:func:`check_response`) that turns statuses into our exception tree.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import quote, urljoin, urlsplit

import aiohttp
from multidict import CIMultiDictProxy

from dao.aio import backoff
from dao.oci.digest import Digest, DigestError
from dao.oci.errors import parse_error_body
from dao.oci.manifest import MAX_MANIFEST_SIZE, media_type_of
from dao.registry.auth import Authenticator
from dao.registry.blobs import BlobSource
from dao.registry.body import read_capped, read_errors
from dao.registry.credentials import Credentials
from dao.registry.errors import (
    RegistryClientError,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamStatusError,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)
from dao.registry.insecure import Resolver, addresses_of, resolve

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_REDIRECTS = 10
ERROR_BODY_LIMIT = 64 * 1024
USER_AGENT = "dao"
# A dao mirror's ``/v2/`` answer carries this header: it serves many registries and routes by ``?ns=``.
NAMESPACES_HEADER = "Dao-Mirror-Namespaces"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 3
    base_delay: float = 0.2
    max_delay: float = 3.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_delay)
        return backoff(attempt, self.base_delay, self.max_delay)


@dataclass(frozen=True, slots=True)
class Manifest:
    body: bytes
    media_type: str
    digest: Digest


@dataclass(frozen=True, slots=True)
class Ping:
    status: int
    namespaces: bool  # the server says it routes ``?ns=<registry>`` (a dao mirror)


@dataclass(frozen=True, slots=True)
class ManifestHead:
    media_type: str
    digest: Digest | None
    size: int | None


def registry_timeout(connect: float = 10.0, read: float = 30.0) -> aiohttp.ClientTimeout:
    """Timeouts for registry traffic: the TCP (and TLS) connect, and silence while reading.

    Never aiohttp's ``connect``, which also counts the wait for a free connection of the session's pool: a
    busy pool is our own queue, not a sign that the upstream is down, and must not trip the circuit breaker.
    """
    return aiohttp.ClientTimeout(total=None, connect=None, sock_connect=connect, sock_read=read)


def check_response(resp: aiohttp.ClientResponse, body: bytes, *expected: int) -> None:
    """Raise the matching error unless ``resp.status`` is one of ``expected``."""
    if resp.status in expected:
        return
    codes = tuple(code for code, _ in parse_error_body(body))
    where = f"{resp.method} {resp.url.path}"
    message = f"{where}: {resp.status} {resp.reason or ''}".strip()
    if codes:
        message += f" ({', '.join(codes)})"
    if resp.status == 404:
        raise UpstreamNotFound(message, resp.status, codes)
    if resp.status in (401, 403):
        raise UpstreamUnauthorized(message, resp.status, codes)
    if resp.status == 429:
        raise UpstreamRateLimited(message, resp.status, codes)
    if resp.status >= 500:
        raise UpstreamUnavailable(message)
    raise UpstreamStatusError(message, resp.status, codes)


def _retry_after(headers: CIMultiDictProxy[str]) -> float | None:
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        try:
            return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
        except (TypeError, ValueError):
            return None


class RegistryClient:
    """One registry (``base_url`` like ``https://registry-1.docker.io``); share it across tasks.

    The caller owns ``session``. Responses handed out by :meth:`blob` are released by the context manager.
    """

    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        *,
        credentials: Credentials | None = None,
        retry: RetryPolicy | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
        namespace: str | None = None,
        tls_verify: bool = True,
    ) -> None:
        """``namespace``: the registry this client asks a mirror about; sent as ``?ns=`` with every request, as
        containerd does, so a mirror of many registries answers for that one. ``tls_verify=False``: HTTPS
        without checking the certificate (an insecure registry, as docker speaks to it)."""
        split = urlsplit(base_url)
        if split.scheme not in ("http", "https") or not split.netloc:
            raise ValueError(f"registry URL must be http(s)://host[:port]: {base_url!r}")
        self.base_url = f"{split.scheme}://{split.netloc}"
        self.host = split.netloc
        self.namespace = namespace
        self.ssl: bool | None = None if tls_verify else False
        self.session = session
        self.auth = Authenticator(session, credentials, http_realm=split.scheme == "http")
        self._scheme = split.scheme
        self._host_name = split.hostname or ""
        self._classes: frozenset[str] | None = None  # address classes of the registry's own host, once looked up
        self.retry = retry or RetryPolicy()
        self.resolver: Resolver = resolve  # host -> addresses, for the redirect check (tests replace it)
        self.ratelimit_remaining: int | None = None  # Docker Hub's count of pulls left, from its last answer
        self.timeout = timeout or registry_timeout()

    # -- API ---------------------------------------------------------------------------------------------

    async def ping(self) -> Ping:
        """``GET /v2/``; a 401 counts as alive (the registry answered)."""
        async with self._send("GET", "/v2/", scope="", authenticate=False) as resp:
            await read_capped(resp, ERROR_BODY_LIMIT)
            self.auth.required = self.auth.required or resp.status == 401
            return Ping(resp.status, resp.headers.get(NAMESPACES_HEADER, "").lower() == "true")

    async def get_manifest(self, repo: str, reference: str, accept: tuple[str, ...]) -> Manifest:
        """The manifest's exact bytes, its media type and digest; the digest is checked, never trusted."""
        headers = {"Accept": ", ".join(accept)} if accept else {}
        path = f"/v2/{repo}/manifests/{reference}"
        async with self._send("GET", path, scope=_pull(repo), headers=headers) as resp:
            body = await read_capped(resp, MAX_MANIFEST_SIZE)
            check_response(resp, body, 200)
            media_type = media_type_of(body, resp.headers.get("Content-Type"))
            header_digest = resp.headers.get("Docker-Content-Digest")
        expected = _digest_or_none(reference) or _digest_or_none(header_digest or "")
        algorithm = expected.algorithm if expected else "sha256"
        actual = Digest.of(body, algorithm)
        if expected is not None and actual != expected:
            raise UpstreamUnavailable(f"{path}: manifest digest mismatch: got {actual}, want {expected}")
        return Manifest(body, media_type, actual)

    async def head_manifest(self, repo: str, reference: str, accept: tuple[str, ...]) -> ManifestHead:
        headers = {"Accept": ", ".join(accept)} if accept else {}
        path = f"/v2/{repo}/manifests/{reference}"
        async with self._send("HEAD", path, scope=_pull(repo), headers=headers) as resp:
            check_response(resp, b"", 200)
            return ManifestHead(
                (resp.headers.get("Content-Type") or "").split(";", 1)[0].strip(),
                _digest_or_none(resp.headers.get("Docker-Content-Digest") or ""),
                resp.content_length,
            )

    async def head_blob(self, repo: str, digest: Digest) -> int | None:
        """The blob's size per the registry (None when it does not say); raises UpstreamNotFound."""
        async with self._send("HEAD", f"/v2/{repo}/blobs/{digest}", scope=_pull(repo)) as resp:
            check_response(resp, b"", 200)
            return resp.content_length

    @asynccontextmanager
    async def blob(
        self, repo: str, digest: Digest, *, start: int = 0, end: int | None = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """An open response for the blob (``200``, or ``206`` when a range was asked and honoured).

        ``end`` is inclusive, as in the ``Range`` header. Read the body yourself; aiohttp errors while
        reading are the caller's to translate (see :func:`read_errors`).
        """
        headers = {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        async with self._send("GET", f"/v2/{repo}/blobs/{digest}", scope=_pull(repo), headers=headers) as resp:
            if resp.status not in (200, 206):
                body = await read_capped(resp, ERROR_BODY_LIMIT)
                check_response(resp, body, 200, 206)
            yield resp

    @property
    def open_to_others(self) -> bool:
        """Whether another client can read this registry with no help from us: it never asked us for
        authorization (a token or a login is ours, not theirs) and is not HTTPS without a checked certificate
        (the other client would refuse it)."""
        return not self.auth.asked and self.ssl is not False

    def open_blob_url(self, repo: str, digest: Digest) -> str | None:
        """The blob's URL for another client to read it with no help from us (None: see ``open_to_others``)."""
        if not self.open_to_others:
            return None
        query = f"?ns={quote(self.namespace, safe='')}" if self.namespace else ""
        return f"{self.base_url}/v2/{repo}/blobs/{digest}{query}"

    def blob_source(self, repo: str, digest: Digest) -> BlobSource:
        """The blob as a source for a transfer (:class:`dao.transfer.sources.BlobSource`)."""
        return BlobSource(self, repo, digest)

    async def raw_get(
        self, path: str, *, scope: str, params: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """A small GET passed through as is (``tags/list``): status, selected headers, body (capped)."""
        async with self._send("GET", path, scope=scope, params=params) as resp:
            body = await read_capped(resp, MAX_MANIFEST_SIZE)
            keep = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "link")}
            return resp.status, keep, body

    # -- transport ---------------------------------------------------------------------------------------

    @asynccontextmanager
    async def _send(
        self,
        method: str,
        path: str,
        *,
        scope: str,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        authenticate: bool = True,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        attempt = 0
        while True:
            try:
                resp = await self._authorized(method, path, scope, headers or {}, params, authenticate)
            except UpstreamUnavailable:
                if attempt + 1 >= self.retry.attempts:
                    raise
                await asyncio.sleep(self.retry.delay(attempt))
                attempt += 1
                continue
            if resp.status in RETRY_STATUSES and attempt + 1 < self.retry.attempts:
                delay = self.retry.delay(attempt, _retry_after(resp.headers))
                resp.release()
                await asyncio.sleep(delay)
                attempt += 1
                continue
            try:
                yield resp
            finally:
                resp.release()
            return

    async def _authorized(
        self,
        method: str,
        path: str,
        scope: str,
        headers: dict[str, str],
        params: dict[str, str] | None,
        authenticate: bool,
    ) -> aiohttp.ClientResponse:
        auth = await self.auth.headers(scope) if authenticate else {}
        resp = await self._follow(method, path, {**headers, **auth}, params)
        # A challenge counts only from the registry itself: a host it redirected us to (a CDN) does not get to
        # name the token server our credentials go to.
        if resp.status == 401 and authenticate and resp.url.host == self._host_name and self._same_scheme(resp):
            challenge = resp.headers.get("WWW-Authenticate", "")
            retry_headers = await self.auth.challenged(challenge, scope, auth.get("Authorization"))
            if retry_headers is not None:
                resp.release()
                resp = await self._follow(method, path, {**headers, **retry_headers}, params)
        return resp

    def _same_scheme(self, resp: aiohttp.ClientResponse) -> bool:
        return resp.url.scheme == self._scheme

    async def _follow(
        self, method: str, path: str, headers: dict[str, str], params: dict[str, str] | None
    ) -> aiohttp.ClientResponse:
        url = self.base_url + path
        headers = {"User-Agent": USER_AGENT, **headers}
        if self.namespace:
            params = {**(params or {}), "ns": self.namespace}
        for _ in range(MAX_REDIRECTS + 1):
            try:
                resp = await self.session.request(
                    method,
                    url,
                    headers=headers,
                    params=params,
                    allow_redirects=False,
                    timeout=self.timeout,
                    ssl=self.ssl,
                )
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise UpstreamUnavailable(f"{method} {url}: {exc.__class__.__name__}: {exc}") from exc
            remaining = resp.headers.get("ratelimit-remaining")
            if remaining:
                self.ratelimit_remaining = _leading_int(remaining)
            location = resp.headers.get("Location")
            if resp.status not in REDIRECT_STATUSES or not location:
                return resp
            resp.release()
            target = urljoin(str(resp.url), location)
            here, there = urlsplit(url), urlsplit(target)
            if there.scheme not in ("http", "https") or not there.hostname:
                raise UpstreamUnavailable(f"{method} {path}: redirect to {target[:200]!r} refused")
            await self._check_redirect(there.hostname, method, path)
            if there.netloc != here.netloc or (here.scheme == "https" and there.scheme == "http"):
                # Credentials never reach another host, nor the same one in the clear.
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url, params = target, None
            if resp.status == 303:
                method = "GET" if method != "HEAD" else "HEAD"
        raise UpstreamUnavailable(f"{method} {path}: more than {MAX_REDIRECTS} redirects")

    async def _check_redirect(self, host: str, method: str, path: str) -> None:
        """Refuse a redirect into loopback, link-local or private addresses unless the registry itself is in
        that class: a public registry must not be able to point the mirror at its own network (a cloud's
        metadata service at 169.254.169.254, an internal admin page)."""
        if host == self._host_name:
            return
        targets = await _address_classes(host, self.resolver)
        inside = targets - {"public"}
        if not inside:
            return
        if self._classes is None:
            self._classes = await _address_classes(self._host_name, self.resolver)
        if not inside <= self._classes:
            raise UpstreamUnavailable(
                f"{method} {path}: redirect to {host[:100]} refused: a {'/'.join(sorted(inside))} address, and "
                f"the registry is not on one"
            )


async def _address_classes(host: str, resolver: Resolver) -> frozenset[str]:
    return frozenset(address_class(a) for a in await addresses_of(host, resolver))


def address_class(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_private or address.is_unspecified or address.is_reserved:
        return "private"
    return "public"


def _digest_or_none(text: str) -> Digest | None:
    try:
        return Digest.parse(text)
    except DigestError:
        return None


def _leading_int(value: str) -> int | None:
    """``100;w=21600`` -> 100."""
    head = value.split(";", 1)[0].strip()
    return int(head) if head.isdigit() else None


def _pull(repo: str) -> str:
    return f"repository:{repo}:pull"


__all__ = [
    "BlobSource",
    "Manifest",
    "ManifestHead",
    "Ping",
    "RegistryClient",
    "RegistryClientError",
    "RetryPolicy",
    "check_response",
    "read_errors",
    "registry_timeout",
]

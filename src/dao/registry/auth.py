"""Registry authentication: ``WWW-Authenticate`` challenges, the Bearer token flow, Basic.

Docker Hub's flow: a request without a token gets ``401`` with
``Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/x:pull"``;
we GET the realm with ``service`` and ``scope`` (Basic credentials if we have them), receive a token valid for
``expires_in`` seconds (60 when absent), and retry once. Tokens are cached per (realm, service, scope) and
shared by every request, so N concurrent blob fetches cost one token request. Once a registry has challenged
us, later scopes fetch their token up front instead of paying a 401 round trip each.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from dao.registry.body import read_capped
from dao.registry.credentials import Credentials
from dao.registry.errors import UpstreamStatusError, UpstreamUnauthorized, UpstreamUnavailable

TOKEN_DEFAULT_EXPIRES = 60
TOKEN_EXPIRY_MARGIN = 10  # refresh this many seconds before the registry would refuse the token
TOKEN_MAX_BODY = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lower-cased: "bearer", "basic"
    params: dict[str, str]


def parse_www_authenticate(header: str) -> list[Challenge]:
    """All challenges in a ``WWW-Authenticate`` value (RFC 7235: auth-params, quoted strings, escapes).

    Malformed input yields what could be read, never an exception: a broken challenge from upstream must not
    crash the caller, it just leaves it without credentials.
    """
    challenges: list[Challenge] = []
    i, n = 0, len(header)
    current: Challenge | None = None

    def skip(chars: str) -> None:
        nonlocal i
        while i < n and header[i] in chars:
            i += 1

    def token() -> str:
        nonlocal i
        start = i
        while i < n and header[i] not in ' \t,="':
            i += 1
        return header[start:i]

    while i < n:
        skip(" \t,")
        if i >= n:
            break
        name = token()
        if not name:
            i += 1  # stray character: step over it
            continue
        skip(" \t")
        if i < n and header[i] == "=" and current is not None:
            i += 1
            skip(" \t")
            if i < n and header[i] == '"':
                i += 1
                chars = []
                while i < n and header[i] != '"':
                    if header[i] == "\\" and i + 1 < n:
                        i += 1
                    chars.append(header[i])
                    i += 1
                i += 1  # closing quote (or end)
                value = "".join(chars)
            else:
                value = token()
            current.params.setdefault(name.lower(), value)
        else:
            current = Challenge(name.lower(), {})
            challenges.append(current)
            # token68 form ("Basic abc=="), ignored: registries use auth-params
    return challenges


@dataclass(slots=True)
class _Token:
    value: str
    expires_at: float


@dataclass
class Authenticator:
    """Authorization for one registry host; safe to share between concurrent requests.

    ``credentials`` are sent only to this registry's host and its token realm, never elsewhere.
    """

    session: aiohttp.ClientSession
    credentials: Credentials | None = None
    http_realm: bool = False  # a token realm may be plain http (only when the registry itself is)
    clock: Callable[[], float] = time.monotonic
    _tokens: dict[tuple[str, str, str], _Token] = field(default_factory=dict)
    _locks: dict[tuple[str, str, str], asyncio.Lock] = field(default_factory=dict)
    required: bool = False  # the registry said it wants authorization (its /v2/ answered 401)
    _bearer: Challenge | None = None  # the registry's last Bearer challenge: lets us fetch tokens up front
    _basic: bool = False

    @property
    def asked(self) -> bool:
        """Whether the registry ever wanted authorization from us, or we have a login for it: either way what
        it serves us may be ours alone, not for a client of its own to read."""
        return self.required or self._bearer is not None or self._basic or self.credentials is not None

    async def headers(self, scope: str) -> dict[str, str]:
        """Authorization to send before any challenge: a cached or pre-fetched token, or Basic."""
        if self._bearer is not None:
            token = await self._token(self._bearer, scope)
            return {"Authorization": f"Bearer {token}"}
        if self._basic and self.credentials:
            return {"Authorization": self.credentials.basic_header()}
        return {}

    async def challenged(self, www_authenticate: str, scope: str, sent: str | None = None) -> dict[str, str] | None:
        """Headers to retry with after a 401, or None when we have nothing better to offer.

        ``sent`` is the Authorization the refused request carried: only that token is thrown away, so the
        many requests that race into the first challenge share one token request instead of one each.
        """
        for challenge in parse_www_authenticate(www_authenticate):
            if challenge.scheme == "bearer" and "realm" in challenge.params:
                self._bearer = challenge
                wanted = challenge.params.get("scope") or scope
                cached = self._tokens.get(self._key(challenge, wanted))
                if cached is not None and sent == f"Bearer {cached.value}":
                    self._drop(challenge, wanted)
                token = await self._token(challenge, wanted)
                return {"Authorization": f"Bearer {token}"}
        for challenge in parse_www_authenticate(www_authenticate):
            if challenge.scheme == "basic" and self.credentials and not self._basic:
                self._basic = True
                return {"Authorization": self.credentials.basic_header()}
        return None

    def _key(self, challenge: Challenge, scope: str) -> tuple[str, str, str]:
        return (challenge.params["realm"], challenge.params.get("service", ""), scope)

    def _drop(self, challenge: Challenge, scope: str) -> None:
        self._tokens.pop(self._key(challenge, scope), None)

    async def _token(self, challenge: Challenge, scope: str) -> str:
        key = self._key(challenge, scope)
        cached = self._tokens.get(key)
        if cached and cached.expires_at > self.clock():
            return cached.value
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # one token request per scope, however many callers wait
            cached = self._tokens.get(key)
            if cached and cached.expires_at > self.clock():
                return cached.value
            value, lifetime = await self._fetch_token(challenge, scope)
            self._tokens[key] = _Token(value, self.clock() + max(lifetime - TOKEN_EXPIRY_MARGIN, 1))
            return value

    async def _fetch_token(self, challenge: Challenge, scope: str) -> tuple[str, int]:
        realm = challenge.params["realm"]
        scheme = urlsplit(realm).scheme
        if scheme not in ("http", "https") or (scheme == "http" and not self.http_realm):
            # Credentials and the token travel this way: never in the clear from an https registry.
            raise UpstreamUnauthorized(f"token realm must be https for an https registry: {realm[:200]!r}")
        params = {"service": challenge.params.get("service", "")}
        if scope:
            params["scope"] = scope
        headers = {}
        if self.credentials and self.credentials.username:
            headers["Authorization"] = self.credentials.basic_header()
        try:
            async with self.session.get(realm, params=params, headers=headers) as resp:
                try:
                    body = await read_capped(resp, TOKEN_MAX_BODY)
                except UpstreamStatusError as exc:
                    raise UpstreamUnauthorized(f"token server {urlsplit(realm).netloc}: {exc}") from exc
                if resp.status in (401, 403):
                    raise UpstreamUnauthorized(f"token server {urlsplit(realm).netloc} refused: {resp.status}")
                if resp.status != 200:
                    raise UpstreamUnavailable(f"token server {urlsplit(realm).netloc} answered {resp.status}")
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"token server unreachable: {exc}") from exc
        except TimeoutError as exc:
            raise UpstreamUnavailable("token server timed out") from exc
        try:
            doc = json.loads(body)
            value = doc.get("token") or doc.get("access_token")
            lifetime = int(doc.get("expires_in") or TOKEN_DEFAULT_EXPIRES)
        except (ValueError, TypeError, AttributeError) as exc:
            raise UpstreamUnauthorized("token server sent no token") from exc
        if not isinstance(value, str) or not value:
            raise UpstreamUnauthorized("token server sent no token")
        return value, lifetime

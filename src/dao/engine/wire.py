"""The engine's own pull over the standard library's HTTP client: what ``dao pull`` needs when the engine
pulls through the local accelerator, and nothing else.

Why a second client: on that path dao's own work is a few small requests, and importing aiohttp (with the
rest of the fetch-and-load path) took ~0.2 s of a 2 s pull from a mirror on the same host, where the docker
CLI starts in 10 ms. Plain ``unix://`` and ``tcp://`` engines only: one with TLS (:func:`reachable` says
False) goes through :class:`dao.engine.client.Engine`. Where the engine is, the version spoken and what its
answers mean are :mod:`dao.engine.api`'s, shared with that client.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

from dao.engine.api import (
    EngineError,
    EngineInfo,
    checked_pull_message,
    choose_version,
    engine_info,
    message_of,
    pull_params,
    resolve_host,
    stream_document,
    tls_wanted,
    unreachable,
    version_of_info,
)

TIMEOUT = 30.0  # seconds for the engine to answer a request (a pull's messages may be minutes apart: none)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("docker", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def reachable(host: str | None = None) -> bool:
    """Whether :class:`WireEngine` can speak to this engine (no TLS)."""
    split = urlsplit(host or resolve_host())
    return split.scheme == "unix" or (split.scheme in ("tcp", "http") and not tls_wanted(split.scheme))


class WireEngine:
    """One engine, spoken to one request per connection (the engine's own pull is a handful)."""

    def __init__(self, host: str | None = None) -> None:
        self.host = host or resolve_host()
        self._split = urlsplit(self.host)
        if not reachable(self.host):
            raise EngineError(f"DOCKER_HOST {self.host!r}: only unix:// and plain tcp:// here")
        self.version = "v1.24"

    def negotiate(self) -> EngineInfo:
        info, api_version = self._answer("/info", versioned=False)
        doc = version_of_info(api_version, info) or self._json("/version", versioned=False)
        self.version = choose_version(doc)
        return engine_info(self.version, doc, info)

    def pull(
        self, image: str, tag: str, *, platform: str | None = None, auth: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """``POST /images/create``: the engine's progress messages as they come; the error it ends with
        raised (see ``Engine.pull``)."""
        query = urlencode(pull_params(image, tag, platform))
        conn, resp = self._request("POST", f"/{self.version}/images/create?{query}", auth, timeout=None)
        try:
            while line := self._read(resp.readline):
                doc = stream_document(line)
                if doc is not None:
                    yield checked_pull_message(doc)
        finally:
            conn.close()

    def _json(self, path: str, *, versioned: bool = True) -> Any:
        return self._answer(path, versioned=versioned)[0]

    def _answer(self, path: str, *, versioned: bool = True) -> tuple[Any, str | None]:
        """The JSON answer of a GET and the engine's API version (its ``Api-Version`` header)."""
        conn, resp = self._request("GET", f"/{self.version}{path}" if versioned else path, None, TIMEOUT)
        try:
            text = self._read(resp.read).decode(errors="replace")
        finally:
            conn.close()
        return (json.loads(text) if text else None), resp.getheader("Api-Version")

    def _request(
        self, method: str, path: str, auth: str | None, timeout: float | None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        if self._split.scheme == "unix":
            conn: http.client.HTTPConnection = _UnixConnection(self._split.path, timeout)
        else:
            conn = http.client.HTTPConnection(self._split.hostname or "", self._split.port or 2375, timeout=timeout)
        headers = {"X-Registry-Auth": auth} if auth else {}
        try:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise unreachable(self.host, exc) from exc
        if resp.status >= 400:
            text = self._read(resp.read).decode(errors="replace")
            conn.close()
            shown = path.split("?", 1)[0].removeprefix(f"/{self.version}")  # as the aiohttp client says it
            raise EngineError(f"{method} {shown}: {resp.status} {message_of(text)}", resp.status)
        return conn, resp

    def _read(self, read: Any) -> bytes:
        try:
            return bytes(read())
        except (OSError, http.client.HTTPException) as exc:
            raise unreachable(self.host, exc) from exc

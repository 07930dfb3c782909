"""The Docker Engine API over aiohttp, reached the way the docker CLI reaches it (see :mod:`dao.engine.api`
for where the engine is and which version is spoken), with ``DOCKER_TLS_VERIFY``/``DOCKER_CERT_PATH`` for
TLS over TCP.

Errors come out as :class:`EngineError` with one line a person can act on (engine down, permission denied).
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from dao.engine.api import (
    DEFAULT_HOST,
    EngineError,
    EngineInfo,
    checked_pull_message,
    choose_version,
    engine_info,
    go_arch,
    message_of,
    pull_params,
    resolve_host,
    stream_document,
    tls_wanted,
    unreachable,
    version_of_info,
)
from dao.paths import docker_config_dir

__all__ = ["DEFAULT_HOST", "Engine", "EngineError", "EngineInfo", "go_arch", "resolve_host"]


class Engine:
    def __init__(self, host: str | None = None) -> None:
        self.host = host or resolve_host()
        split = urlsplit(self.host)
        ssl_context: ssl.SSLContext | bool = False
        if split.scheme == "unix":
            self._connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=split.path)
            self._base = "http://docker"
        elif split.scheme in ("tcp", "http", "https"):
            tls = tls_wanted(split.scheme)
            if tls:
                ssl_context = _tls_context(Path(os.environ.get("DOCKER_CERT_PATH") or docker_config_dir()))
            self._connector = aiohttp.TCPConnector(ssl=ssl_context)
            self._base = f"{'https' if tls else 'http'}://{split.netloc}"
        else:
            raise EngineError(f"DOCKER_HOST {self.host!r}: use unix:///path or tcp://host:port")
        self.session = aiohttp.ClientSession(connector=self._connector, timeout=aiohttp.ClientTimeout(total=None))
        self.version = "v1.24"

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.session.close()

    # -- API -----------------------------------------------------------------------------------------------

    async def negotiate(self) -> EngineInfo:
        info, api_version = await self._answer("GET", "/info", versioned=False)
        doc = version_of_info(api_version, info) or await self._json("GET", "/version", versioned=False)
        self.version = choose_version(doc)
        return engine_info(self.version, doc, info)

    # Typed calls: the operation and its parameters are named here, once; the answers are the API's documents.
    # Refusals raise EngineError with the engine's status (404 gone, 409 in use or conflict).

    async def containers(self, *, stopped: bool = True, filters: dict[str, list[str]] | None = None) -> list[Any]:
        """``stopped``: not only the running ones (``docker ps -a``)."""
        params = {"all": "1" if stopped else "0"}
        if filters:
            params["filters"] = json.dumps(filters)
        return _list(await self._json("GET", "/containers/json", params=params))

    async def inspect_container(self, container: str) -> dict[str, Any]:
        return await self._json("GET", f"/containers/{quote(container, safe='')}/json")

    async def remove_container(self, container: str, *, force: bool = False) -> None:
        """Without force: the engine refuses (409) a running one. With it, a running one is killed first."""
        await self._json("DELETE", f"/containers/{quote(container, safe='')}", params={"force": "1"} if force else None)

    async def create_container(self, name: str, config: dict[str, Any]) -> str:
        """``POST /containers/create`` with the Engine API's container config; the new container's ID."""
        created = await self._json("POST", "/containers/create", params={"name": name}, body=config)
        return str(created.get("Id", ""))

    async def start_container(self, container: str) -> None:
        """Already running: the engine answers 304, which is not an error."""
        await self._json("POST", f"/containers/{quote(container, safe='')}/start")

    async def stop_container(self, container: str, *, grace: int = 10) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds (``docker stop -t``)."""
        await self._json("POST", f"/containers/{quote(container, safe='')}/stop", params={"t": str(grace)})

    async def restart_container(self, container: str, *, grace: int = 10) -> None:
        await self._json("POST", f"/containers/{quote(container, safe='')}/restart", params={"t": str(grace)})

    async def logs(
        self, container: str, *, follow: bool = False, tail: int = 100, timestamps: bool = False
    ) -> AsyncIterator[tuple[str, bytes]]:
        """A container's output as ``(stream, chunk)`` pairs, stream ``stdout`` or ``stderr`` (``tty`` for a
        container with a terminal, whose two streams the engine cannot tell apart). With ``follow`` it goes on
        until the container stops or the caller does."""
        tty = bool(((await self.inspect_container(container)).get("Config") or {}).get("Tty"))
        params = {"stdout": "1", "stderr": "1", "tail": str(tail), "follow": "1" if follow else "0"}
        if timestamps:
            params["timestamps"] = "1"
        url = f"{self._base}/{self.version}/containers/{quote(container, safe='')}/logs"
        try:
            async with self.session.get(url, params=params) as resp:
                if resp.status >= 400:
                    raise EngineError(f"GET logs: {resp.status} {message_of(await resp.text())}", resp.status)
                if tty:
                    async for chunk in resp.content.iter_any():
                        yield "tty", chunk
                    return
                while True:  # multiplexed: an 8-byte header (stream, 0, 0, 0, big-endian length) per frame
                    try:
                        header = await resp.content.readexactly(8)
                        chunk = await resp.content.readexactly(int.from_bytes(header[4:8], "big"))
                    except asyncio.IncompleteReadError:
                        return
                    yield ("stderr" if header[0] == 2 else "stdout"), chunk
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from exc

    async def images(self, *, intermediate: bool = False) -> list[dict[str, Any]]:
        """``intermediate``: the untagged build steps too (``docker images -a``)."""
        return _list(await self._json("GET", "/images/json", params={"all": "1"} if intermediate else None))

    async def inspect_image(self, ref: str) -> dict[str, Any] | None:
        try:
            return await self._json("GET", f"/images/{quote(ref, safe='')}/json")
        except EngineError as exc:
            if exc.status == 404:
                return None
            raise

    async def remove_image(self, ref: str, *, noprune: bool = True) -> list[dict[str, Any]]:
        """Without force: an image in use, or one several repositories name (by ID), is refused (409). With
        ``noprune`` its untagged parents stay. Returns the engine's ``Untagged``/``Deleted`` entries."""
        params = {"noprune": "1"} if noprune else None
        return _list(await self._json("DELETE", f"/images/{quote(ref, safe='')}", params=params))

    async def tag_image(self, image: str, repo: str, tag: str) -> None:
        await self._json("POST", f"/images/{quote(image, safe='')}/tag", params={"repo": repo, "tag": tag})

    async def volumes(self) -> list[dict[str, Any]]:
        return _list((await self._json("GET", "/volumes") or {}).get("Volumes"))

    async def remove_volume(self, name: str) -> None:
        await self._json("DELETE", f"/volumes/{quote(name, safe='')}")

    async def networks(self) -> list[dict[str, Any]]:
        return _list(await self._json("GET", "/networks"))

    async def inspect_network(self, network: str) -> dict[str, Any]:
        return await self._json("GET", f"/networks/{quote(network, safe='')}")

    async def remove_network(self, network: str) -> None:
        await self._json("DELETE", f"/networks/{quote(network, safe='')}")

    async def system_df(self) -> dict[str, Any]:
        """What ``docker system df`` counts (API 1.25 and later)."""
        return await self._json("GET", "/system/df") or {}

    async def prune_build_cache(self, ids: list[str]) -> dict[str, Any]:
        """Remove these build cache records (``docker builder prune --filter id=...``)."""
        return await self._json("POST", "/build/prune", params={"filters": json.dumps({"id": ids})}) or {}

    async def events(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        filters: dict[str, list[str]] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """The engine's event stream (``docker events``): one document per event, as they happen. ``since`` and
        ``until`` are unix times; with ``until`` the stream ends then (in the past: what happened in between,
        and the end), otherwise when the engine closes it or the caller stops. A cut stream raises
        :class:`EngineError`."""
        params: dict[str, str] = {}
        if since is not None:
            params["since"] = f"{since:.9f}"
        if until is not None:
            params["until"] = f"{until:.9f}"
        if filters:
            params["filters"] = json.dumps(filters)
        async for doc in self._stream("GET", "/events", params):
            yield doc

    async def pull(
        self, image: str, tag: str, *, platform: str | None = None, auth: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """The engine's own pull (``POST /images/create``): its progress messages as they come (``status``,
        ``id``, ``progressDetail``); the error it ends with raised. ``auth``: the X-Registry-Auth value."""
        headers = {"X-Registry-Auth": auth} if auth else None
        async for doc in self._stream("POST", "/images/create", pull_params(image, tag, platform), headers):
            yield checked_pull_message(doc)

    async def _stream(
        self, method: str, path: str, params: dict[str, str], headers: dict[str, str] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """A newline-delimited JSON answer, one document a line, as the lines come."""
        url = f"{self._base}/{self.version}{path}"
        try:
            async with self.session.request(method, url, params=params or None, headers=headers) as resp:
                if resp.status >= 400:
                    raise EngineError(f"{method} {path}: {resp.status} {message_of(await resp.text())}", resp.status)
                while line := await resp.content.readline():
                    doc = stream_document(line)
                    if doc is not None:
                        yield doc
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from exc

    async def load(self, body: AsyncIterator[bytes]) -> list[dict[str, Any]]:
        """POST a docker-archive stream to ``/images/load``; the engine's progress messages, errors raised."""
        url = f"{self._base}/{self.version}/images/load?quiet=1"
        try:
            async with self.session.post(url, data=body, headers={"Content-Type": "application/x-tar"}) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise EngineError(f"the engine refused the image: {message_of(text)}")
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from exc
        messages = []
        for line in text.splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and msg.get("error"):
                raise EngineError(f"the engine refused the image: {msg['error']}")
            messages.append(msg)
        return messages

    async def get_archive(self, container: str, path: str) -> AsyncIterator[bytes]:
        """A tar stream of ``path`` in the container (``docker cp`` out; the container may be stopped)."""
        url = f"{self._base}/{self.version}/containers/{quote(container, safe='')}/archive"
        try:
            async with self.session.get(url, params={"path": path}) as resp:
                if resp.status >= 400:
                    raise EngineError(f"GET archive: {resp.status} {message_of(await resp.text())}", resp.status)
                async for chunk in resp.content.iter_chunked(256 * 1024):
                    yield chunk
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from exc

    async def put_archive(self, container: str, path: str, body: AsyncIterator[bytes]) -> None:
        """Unpack a tar stream into the directory ``path`` of a (created, not necessarily started) container."""
        url = f"{self._base}/{self.version}/containers/{quote(container, safe='')}/archive"
        try:
            async with self.session.put(
                url, params={"path": path}, data=body, headers={"Content-Type": "application/x-tar"}
            ) as resp:
                if resp.status >= 400:
                    raise EngineError(f"PUT archive: {resp.status} {message_of(await resp.text())}", resp.status)
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from exc

    # -- transport -----------------------------------------------------------------------------------------

    async def _json(self, method: str, path: str, **how: Any) -> Any:
        """The JSON answer (``how``: :meth:`_answer`'s options)."""
        return (await self._answer(method, path, **how))[0]

    async def _answer(
        self,
        method: str,
        path: str,
        *,
        versioned: bool = True,
        params: dict[str, str] | None = None,
        body: Any = None,
    ) -> tuple[Any, str | None]:
        """The JSON answer and the engine's API version (its ``Api-Version`` header)."""
        url = f"{self._base}/{self.version}{path}" if versioned else f"{self._base}{path}"
        try:
            async with self.session.request(method, url, params=params or None, json=body) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise EngineError(f"{method} {path}: {resp.status} {message_of(text)}", resp.status)
                return (json.loads(text) if text else None), resp.headers.get("Api-Version")
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: Exception) -> EngineError:
        return unreachable(self.host, exc)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _tls_context(cert_path: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert_path / "ca.pem"))
    context.load_cert_chain(str(cert_path / "cert.pem"), str(cert_path / "key.pem"))
    return context

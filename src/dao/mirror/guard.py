"""Connections a client may hold: at most ``per_client`` from one address, and headers within ``header_timeout``.

A slow-loris client opens connections and sends its request headers a byte at a time; aiohttp has no deadline
for them. Every accepted connection is wrapped in :class:`_Guarded`, which refuses one over the address's
limit at once, and closes one whose request headers have not all arrived ``header_timeout`` seconds after its
first byte (or after the connection opened). The :func:`middleware` tells the guard when a request's headers
are in (aiohttp parsed them) and when its answer is done; between requests aiohttp's keep-alive timeout rules.
Slow *readers* are the business of :class:`~dao.mirror.serve.SendPolicy`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from dao.config import MirrorConfig

log = logging.getLogger(__name__)


class ConnectionGuard:
    def __init__(
        self,
        per_client: int = MirrorConfig.max_connections_per_client,
        header_timeout: float = MirrorConfig.header_timeout,
    ) -> None:
        self.per_client = per_client
        self.header_timeout = header_timeout
        self.open: dict[str, int] = {}
        self.refused = 0
        self._by_transport: dict[asyncio.BaseTransport, _Guarded] = {}

    def wrap(self, server: Any) -> Any:
        return _GuardedServer(server, self)


GUARD_KEY = web.AppKey("guard", ConnectionGuard)


class _GuardedServer:
    """aiohttp's protocol factory (``web.Server``) with every protocol it makes wrapped."""

    def __init__(self, server: Any, guard: ConnectionGuard) -> None:
        self._server, self._guard = server, guard

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self._guard, self._server())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class _Guarded(asyncio.Protocol):
    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard, self.inner = guard, inner
        self.transport: asyncio.Transport | None = None
        self.address = ""
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if peer else ""
        guard = self.guard
        if guard.open.get(self.address, 0) >= guard.per_client:
            guard.refused += 1
            if guard.refused in (1, 10, 100, 1000) or guard.refused % 10000 == 0:
                log.warning(
                    "%s holds %d connections, the most one address may: refused (%d so far)",
                    self.address,
                    guard.per_client,
                    guard.refused,
                )
            transport.abort()
            return
        guard.open[self.address] = guard.open.get(self.address, 0) + 1
        guard._by_transport[transport] = self
        self.transport = transport
        self.inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        if not self.busy and self.timer is None:
            self._arm()  # a new request begins: its headers have header_timeout to arrive
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.transport is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return
        self._disarm()
        self.guard._by_transport.pop(self.transport, None)
        left = self.guard.open.get(self.address, 0) - 1
        if left > 0:
            self.guard.open[self.address] = left
        else:
            self.guard.open.pop(self.address, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _arm(self) -> None:
        self._disarm()
        self.timer = asyncio.get_running_loop().call_later(self.guard.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        if not self.busy and self.transport is not None:
            log.info("%s sent no complete request headers in %.0fs: closed", self.address, self.guard.header_timeout)
            self.transport.abort()

    def started(self) -> None:
        self.busy = True
        self._disarm()

    def finished(self) -> None:
        self.busy = False


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: the request's headers are in; no header deadline while it is answered."""
    guard = request.app.get(GUARD_KEY)
    guarded = guard._by_transport.get(request.transport) if guard is not None and request.transport else None
    if guarded is None:
        return await handler(request)
    guarded.started()
    try:
        return await handler(request)
    finally:
        guarded.finished()


class GuardedRunner(web.AppRunner):
    """aiohttp's runner whose every connection goes through the :class:`ConnectionGuard`."""

    def __init__(self, guard: ConnectionGuard, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard

    async def _make_server(self) -> web.Server:
        return self.guard.wrap(await super()._make_server())

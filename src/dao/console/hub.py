"""The console's live side: the open agent channels, the commands in flight on them, what each host last
reported, and the pages listening for changes.

A command is sent only to a host whose channel is open (a page never queues work for an offline host: it
says so). One that has no result when its channel drops is sent again, same ID, when the host is back
within the caller's time; the agent's ledger makes the second sending a question ("what came of it?"),
never a second run. Results and streamed output count only from the host the command went to.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from dao.channel.frames import Command, FrameError, Result, State, Stream, encode
from dao.errors import DaoError

if TYPE_CHECKING:
    from dao.console.relay import Relay

EVENTS_KEPT = 100  # engine events kept per host for its page
SUBSCRIBER_QUEUE = 256  # messages a slow page may fall behind before it is dropped (it reloads)


class HostOffline(DaoError):
    pass


class CommandTimeout(DaoError):
    pass


@dataclass
class Pending:
    host_id: str
    command: Command
    result: asyncio.Future[Result]
    on_stream: Callable[[str], None] | None = None


@dataclass
class Live:
    """What a host said last: its engine's state and its latest events, for the pages."""

    state: State | None = None
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))


class Hub:
    def __init__(self, ping_interval: float) -> None:
        self.ping_interval = ping_interval
        self.channels: dict[str, web.WebSocketResponse] = {}
        self.owners: dict[str, str] = {}  # host ID -> user ID, for the hosts that have been connected
        self.addresses: dict[str, str] = {}  # host ID -> the address its channel came from (its apps' endpoints)
        self.live: dict[str, Live] = {}
        self.pending: dict[str, Pending] = {}
        self.heard: dict[str, float] = {}  # host ID -> when its last pong came, not yet written
        self.unwritten: list[tuple[str, int, list[dict[str, Any]], web.WebSocketResponse]] = []  # metrics frames
        self._subscribers: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
        self.relay: Relay | None = None  # console nodes (--redis): the channels on the other nodes

    # -- commands ------------------------------------------------------------------------------------------

    async def call(
        self,
        host_id: str,
        op: str,
        args: dict[str, Any],
        *,
        within: float | None = 60.0,
        on_stream: Callable[[str], None] | None = None,
    ) -> Result:
        """Run ``op`` on the host and wait for its result. Cancelled (the page went away) or timed out, a
        command still running is cancelled at the agent."""
        if host_id not in self.channels:
            if self.relay is not None and self.relay.holds(host_id):
                try:
                    return await self.relay.call(host_id, op, args, within, on_stream)
                except TimeoutError:
                    raise CommandTimeout(f"{op} did not finish within {within:g} s") from None
            raise HostOffline("the host is offline: its channel to the console is not open")
        command = Command(secrets.token_hex(12), op, args)
        try:
            encode(command)
        except FrameError as exc:
            raise DaoError(f"the command is too big to send: {exc}") from None
        pending = Pending(host_id, command, asyncio.get_running_loop().create_future(), on_stream)
        self.pending[command.id] = pending
        try:
            await self._send(host_id, command)
            async with asyncio.timeout(within):
                return await pending.result
        except TimeoutError:
            raise CommandTimeout(f"{op} did not finish within {within:g} s") from None
        finally:
            del self.pending[command.id]
            if not pending.result.done() or pending.result.cancelled():  # (the caller's cancel cancels it too)
                cancel = Command(secrets.token_hex(12), "command.cancel", {"id": command.id})
                await self._send(host_id, cancel)

    def is_open(self, host_id: str) -> bool:
        """The host's channel is open, on this node or (console nodes) another."""
        return host_id in self.channels or (self.relay is not None and self.relay.holds(host_id))

    def resend(self, host_id: str) -> list[Command]:
        """The commands still waiting on this host, for a channel that has just opened."""
        return [p.command for p in self.pending.values() if p.host_id == host_id]

    def answered(self, host_id: str, frame: Result | Stream) -> None:
        pending = self.pending.get(frame.id)
        if pending is None or pending.host_id != host_id:
            return  # late (the caller gave up), or not this host's to answer
        if isinstance(frame, Stream):
            if pending.on_stream is not None:
                pending.on_stream(frame.data)
        elif not pending.result.done():
            pending.result.set_result(frame)

    async def _send(self, host_id: str, command: Command) -> None:
        ws = self.channels.get(host_id)
        if ws is not None and not ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(encode(command))

    # -- what the hosts report, for the pages ----------------------------------------------------------------

    def reported(self, host_id: str, user_id: str, kind: str, data: Any, *, relay: bool = True) -> None:
        """``relay``: also to the other console nodes (False for what came from one)."""
        if relay and self.relay is not None:
            self.relay.report(host_id, user_id, kind, data)
        live = self.live.setdefault(host_id, Live())
        if kind == "state":
            live.state = data
        elif kind == "event":
            live.events.append(data)
        payload = data if kind != "state" else {"containers": data.containers, "images": data.images}
        self.publish(user_id, {"kind": kind, "host": host_id, "at": time.time(), "data": payload}, relay=False)

    def subscribe(self, user_id: str) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers.setdefault(user_id, set()).add(queue)
        return queue

    def unsubscribe(self, user_id: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
        queues = self._subscribers.get(user_id, set())
        queues.discard(queue)
        if not queues:
            self._subscribers.pop(user_id, None)

    def publish(self, user_id: str, message: dict[str, Any], *, relay: bool = True) -> None:
        """To every page of this user (and no other's), on every console node unless ``relay`` is False. A
        page that has fallen this far behind is sent a ``reload`` in place of what it missed."""
        if relay and self.relay is not None:
            self.relay.publish(user_id, message)
        for queue in list(self._subscribers.get(user_id, ())):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    while True:
                        queue.get_nowait()
                queue.put_nowait({"kind": "reload"})
            else:
                queue.put_nowait(message)

"""The agents' side of the console: enrolment and the agent channel (``docs/agent.md``).

``POST /api/agent/enroll`` swaps a one-time token for a host and its credential. ``GET /api/agent/channel``
is the WebSocket each agent dials: authenticated by its credential, it must say ``hello`` first, gets
``welcome``, then is pinged every ``ping_interval``; three unanswered pings close it. Metrics are stored and
acknowledged; state, events and command results go to the :class:`Hub`. A bad frame closes that one channel
with a reason (1003, 1009 when too big), never the console. A host has one channel: a new one replaces the
old.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import WSCloseCode, WSMsgType, web

from dao.channel.frames import (
    MAX_FRAME,
    Ack,
    Event,
    FrameError,
    Hello,
    Metrics,
    Ping,
    Pong,
    Result,
    State,
    Stream,
    Welcome,
    decode,
    encode,
)
from dao.console.hub import Hub
from dao.console.peers import PEERING_KEY, Peering
from dao.console.store import EnrollError, Host, Store

log = logging.getLogger("dao.console")

HELLO_TIMEOUT = 10.0
SAMPLES_EVERY = 0.25  # seconds between writes of the metrics frames received (and their acks)
MAX_ENROLL_BODY = 16 * 1024
STORE_KEY = web.AppKey("store", Store)
HUB_KEY = web.AppKey("hub", Hub)


async def enroll(request: web.Request) -> web.Response:
    try:
        doc = json.loads(await request.content.read(MAX_ENROLL_BODY + 1) or b"{}")
    except ValueError:
        return _error(400, 'the body must be JSON: {"token": ..., "name": ...}')
    if not isinstance(doc, dict) or not isinstance(doc.get("token"), str) or len(doc["token"]) > 200:
        return _error(400, 'give the enrolment token as {"token": "..."}')
    name = doc.get("name") if isinstance(doc.get("name"), str) else ""
    try:
        host, credential, user = await asyncio.to_thread(request.app[STORE_KEY].redeem, doc["token"], name)
    except EnrollError as exc:
        return _error(403, str(exc))
    log.info("host %s (%s) enrolled", host, name)
    answer = {"host": host, "credential": credential}
    mirror = await _mirror_of(request, user)
    if mirror:
        answer["mirror"] = mirror  # the user's accelerator address: install.sh points the host's Docker at it
    return web.json_response(answer)


async def _mirror_of(request: web.Request, user_id: str) -> str | None:
    from dao.console.accelerator_web import ACCELERATOR_KEY

    accel = request.app.get(ACCELERATOR_KEY)
    return None if accel is None else await asyncio.to_thread(accel.mirror, user_id)


async def channel(request: web.Request) -> web.StreamResponse:
    store, hub = request.app[STORE_KEY], request.app[HUB_KEY]
    scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
    host = await asyncio.to_thread(store.host_by_credential, credential.strip()) if scheme == "Bearer" else None
    if host is None or host.revoked:
        return _error(401, "unknown or revoked host credential")
    ws = web.WebSocketResponse(max_msg_size=MAX_FRAME, heartbeat=None)
    await ws.prepare(request)
    old = hub.channels.get(host.id)
    hub.channels[host.id] = ws
    hub.owners[host.id] = host.user_id
    hub.addresses[host.id] = request.remote or ""
    if old is not None:
        await old.close(code=WSCloseCode.POLICY_VIOLATION, message=b"replaced by a new connection")
    if hub.relay is not None:
        await hub.relay.opened(host.id, host.user_id, request.remote or "")
    peering = request.app.get(PEERING_KEY)
    try:
        await _serve(ws, host, store, hub, peering)
    finally:
        if hub.channels.get(host.id) is ws:
            del hub.channels[host.id]
            if hub.relay is not None:
                await hub.relay.closed(host.id)
            await asyncio.to_thread(store.disconnected, host.id)
            hub.publish(host.user_id, {"kind": "offline", "host": host.id})
            if peering is not None:
                await peering.left(host.id, host.user_id)
    return ws


async def _serve(ws: web.WebSocketResponse, host: Host, store: Store, hub: Hub, peering: Peering | None) -> None:
    host_id = host.id
    try:
        first = await ws.receive(timeout=HELLO_TIMEOUT)
        hello = decode(first.data) if first.type == WSMsgType.TEXT else None
    except (TimeoutError, FrameError):
        hello = None
    if not isinstance(hello, Hello):
        await ws.close(code=WSCloseCode.PROTOCOL_ERROR, message=b"say hello first")
        return
    await asyncio.to_thread(store.connected, host_id, hello.facts, hello.version, hub.ping_interval)
    await ws.send_str(encode(Welcome(host_id, hub.ping_interval)))
    hub.publish(host.user_id, {"kind": "online", "host": host_id})
    for command in hub.resend(host_id):  # sent before this channel opened and not answered: ask again
        await ws.send_str(encode(command))
    if peering is not None:
        await peering.joined(host_id, host.user_id, hello.facts)
    heard = time.monotonic()

    async def pinger() -> None:
        while not ws.closed:
            await asyncio.sleep(hub.ping_interval)
            if time.monotonic() - heard > 3 * hub.ping_interval:
                log.info("host %s: no answer to 3 pings, channel closed", host_id)
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"no answer to pings")
                return
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(encode(Ping(time.time())))

    task = asyncio.get_running_loop().create_task(pinger())
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=b"text frames only")
                return
            try:
                frame = decode(msg.data)
            except FrameError as exc:
                log.warning("host %s sent a bad frame, channel closed: %s", host_id, exc)
                await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=str(exc)[:120].encode())
                return
            heard = time.monotonic()
            if isinstance(frame, Pong):
                hub.heard[host_id] = time.time()  # written with every other host's in one go (heartbeat)
            elif isinstance(frame, Metrics):
                hub.unwritten.append((host_id, frame.seq, frame.samples, ws))  # acked once written (heartbeat)
                if frame.samples:
                    hub.reported(host_id, host.user_id, "metrics", frame.samples[-1])
            elif isinstance(frame, State):
                hub.reported(host_id, host.user_id, "state", frame)
            elif isinstance(frame, Event):
                hub.reported(host_id, host.user_id, "event", frame.event)
            elif isinstance(frame, Result | Stream):
                hub.answered(host_id, frame)
            else:
                await ws.close(code=WSCloseCode.PROTOCOL_ERROR, message=f"{frame.kind} is not for the console".encode())
                return
    finally:
        task.cancel()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def write_samples(store: Store, hub: Hub) -> None:
    """The metrics frames received since the last time, every host's, in one transaction; then each is
    acknowledged (an agent forgets samples only once they are stored). If the write fails they stay
    unacknowledged, and the agents send them again."""
    batch, hub.unwritten = hub.unwritten, []
    if not batch:
        return
    try:
        await asyncio.to_thread(store.add_sample_batches, [(h, seq, samples) for h, seq, samples, _ in batch])
    except Exception:
        log.exception("cannot store %d metrics frames (their agents will send them again)", len(batch))
        return
    for _, seq, _, ws in batch:
        if not ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(encode(Ack(seq)))


async def heartbeat(app: web.Application) -> None:
    """For all hosts together, not per frame or per ping for each (at 1,000 hosts, 300 statements a second
    less): every ``SAMPLES_EVERY`` the metrics frames received are written in one transaction; once a second
    the pongs heard are written as ``last_seen`` in one statement, and the open channels of hosts revoked
    meanwhile (by ``dao console revoke`` in another process) are closed."""
    store, hub = app[STORE_KEY], app[HUB_KEY]
    every = min(1.0, hub.ping_interval / 2)
    beats = 0
    while True:
        await asyncio.sleep(SAMPLES_EVERY)
        await write_samples(store, hub)
        beats += 1
        if beats * SAMPLES_EVERY < every:
            continue
        beats = 0
        heard, hub.heard = hub.heard, {}
        try:
            if heard:
                await asyncio.to_thread(store.seen_many, heard)
            revoked = await asyncio.to_thread(store.revoked_among, set(hub.channels)) if hub.channels else set()
        except Exception:  # the database went away for a moment: the next beat tries again
            log.exception("heartbeat")
            hub.heard = {**heard, **hub.heard}
            continue
        for host_id in revoked:
            ws = hub.channels.get(host_id)
            if ws is not None:
                log.info("host %s revoked: channel closed", host_id)
                await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"this host was revoked")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/agent/enroll", enroll)
    app.router.add_get("/api/agent/channel", channel)

    async def beating(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(heartbeat(app))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(beating)

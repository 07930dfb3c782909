"""Console nodes as one console (``dao console serve --redis URL``): N processes behind a load balancer, on one
SQL database (accounts, sessions, hosts, apps: already shared) and one Redis, for what lives in a process.

- **Where each channel is**: the node an agent's channel reached records ``host -> node`` in one hash
  (``channels``) and says so to the others (``open``/``close`` on the events channel); each node keeps the
  others' in memory, refreshed from the hash every ``REFRESH`` seconds, keeping only nodes whose
  ``alive:<node>`` key (renewed every ``REFRESH``, expiring after ``NODE_TTL``) is still there.
- **Commands and streams for a host on another node**: the asking node publishes the command on that node's
  channel (``node:<id>``); the holder runs it on its channel as its own and publishes each streamed piece and
  the result on the asker's reply channel (``reply:<id>``), so a log stream asked of one node flows from the
  other. A command published to a node nobody listens for (it died) is answered "offline" at once. A page
  that goes away cancels it there too.
- **What the hosts report** (state, events, metrics, online and offline) is published to every node, which
  keeps the remote hosts' state for its pages and passes the messages to its own page listeners.
- **The scheduler** runs on one node at a time: the one holding ``leader`` (``<fencing token> <node>``, set if
  absent, renewed every tick, expiring after ``LEADER_TTL``). A node that dies loses it within the TTL and
  the next node to ask takes it.

A node that dies drops only its own channels; those agents dial again (through the balancer) and reach
another node by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from dao.channel.frames import FrameError, Result, State, decode, encode
from dao.console.hub import HostOffline

if TYPE_CHECKING:
    from dao.console.hub import Hub

log = logging.getLogger("dao.console.relay")

REFRESH = 2.0  # seconds between a node's renewals of its alive key and re-reads of where the channels are
NODE_TTL = 6.0  # seconds a node's alive key outlives it
LEADER_TTL = 10.0  # seconds the scheduler's lease outlives a node that stopped renewing it
POOL = 32  # Redis connections of one node (the subscription has one more of its own)
OUTBOX = 10_000  # reports waiting to be published; past that the newest are dropped (a page reloads on reconnect)
BATCH = 200  # reports published in one round trip
PREFIX = "dao:console:"
OFFLINE = "the host is offline: its channel to the console is not open"

_TAKE = """
local held = redis.call('GET', KEYS[1])
if held then
  local space = string.find(held, ' ')
  if string.sub(held, space + 1) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return held
  end
  return held
end
local value = redis.call('INCR', KEYS[2]) .. ' ' .. ARGV[1]
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"""


@dataclass(slots=True)
class Remote:
    node: str
    user: str
    address: str


class Relay:
    def __init__(self, url: str, hub: Hub, node: str | None = None) -> None:
        self.url = url
        self.hub = hub
        self.node = node or f"{os.uname().nodename}-{os.getpid()}-{secrets.token_hex(3)}"
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=POOL, timeout=None, socket_connect_timeout=2, socket_timeout=None
        )  # (a busy node waits for a connection rather than failing its calls)
        self.redis: Any = aioredis.Redis(connection_pool=pool)
        self._outbox: asyncio.Queue[str] = asyncio.Queue(OUTBOX)
        self._take = self.redis.register_script(_TAKE)
        self.remote: dict[str, Remote] = {}  # host ID -> where its channel is, for hosts on other nodes
        self.token = 0  # the fencing token of the scheduler's lease while this node holds it
        self._replies: dict[str, tuple[asyncio.Queue[dict[str, Any]], str]] = {}  # request ID -> (queue, node)
        self._serving: dict[str, asyncio.Task[None]] = {}  # requests from other nodes running here
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: Any = None
        self.dropped = 0

    def key(self, *parts: str) -> str:
        return PREFIX + ":".join(parts)

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(self.key("events"), self.key("node", self.node), self.key("reply", self.node))
        await self._beat()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen(), name="relay listen"),
            loop.create_task(self._beating()),
            loop.create_task(self._sending(), name="relay send"),
        ]
        log.info("console node %s on redis %s", self.node, self.url)

    async def aclose(self) -> None:
        for task in [*self._tasks, *self._serving.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._serving.values(), return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            mine = [h for h in self.hub.channels]
            if mine:
                await self.redis.hdel(self.key("channels"), *mine)
            await self.redis.delete(self.key("alive", self.node))
            if self.token:
                await self.redis.delete(self.key("leader"))
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()
            await self.redis.aclose()

    async def _beating(self) -> None:
        while True:
            await asyncio.sleep(REFRESH)
            try:
                await self._beat()
            except (RedisError, OSError) as exc:
                log.warning("redis: cannot renew this node or read where the channels are: %s", exc)

    async def _beat(self) -> None:
        await self.redis.set(self.key("alive", self.node), b"1", px=int(NODE_TTL * 1000))
        channels = await self.redis.hgetall(self.key("channels"))
        nodes = {json.loads(v)["node"] for v in channels.values()} - {self.node}
        alive = {n for n in nodes if await self.redis.exists(self.key("alive", n))}
        remote: dict[str, Remote] = {}
        for host, value in channels.items():
            doc = json.loads(value)
            host_id = host.decode() if isinstance(host, bytes) else host
            if doc["node"] in alive and host_id not in self.hub.channels:
                remote[host_id] = Remote(doc["node"], doc["user"], doc["address"])
        self.remote = remote
        for host_id, r in remote.items():
            self.hub.owners[host_id], self.hub.addresses[host_id] = r.user, r.address

    # -- channels opened and closed here -------------------------------------------------------------------

    async def opened(self, host_id: str, user: str, address: str) -> None:
        doc = {"node": self.node, "user": user, "address": address}
        self.remote.pop(host_id, None)
        await self._quiet(self.redis.hset(self.key("channels"), host_id, json.dumps(doc)))
        self._post({"type": "open", "host": host_id, **doc})

    async def closed(self, host_id: str) -> None:
        held = await self._quiet(self.redis.hget(self.key("channels"), host_id))
        if held is not None and json.loads(held)["node"] == self.node:
            await self._quiet(self.redis.hdel(self.key("channels"), host_id))
        self._post({"type": "close", "host": host_id, "node": self.node})

    async def _quiet(self, work: Any) -> Any:
        try:
            return await work
        except (RedisError, OSError) as exc:
            log.warning("redis: %s", exc)
            return None

    # -- what the hosts report, to every node ----------------------------------------------------------------

    def report(self, host_id: str, user: str, kind: str, data: Any) -> None:
        payload = encode(data) if isinstance(data, State) else data
        self._post({"type": "report", "host": host_id, "user": user, "kind": kind, "data": payload})

    def publish(self, user: str, message: dict[str, Any]) -> None:
        self._post({"type": "publish", "user": user, "message": message})

    def _post(self, doc: dict[str, Any]) -> None:
        """To the other nodes, in order, batched: the frames of a thousand agents cost a few round trips."""
        try:
            self._outbox.put_nowait(json.dumps({**doc, "from": self.node}))
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("redis: %d reports not passed to the other nodes (it does not keep up)", self.dropped)

    async def _sending(self) -> None:
        while True:
            batch = [await self._outbox.get()]
            while len(batch) < BATCH and not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            pipe = self.redis.pipeline(transaction=False)
            for doc in batch:
                pipe.publish(self.key("events"), doc)
            await self._quiet(pipe.execute())

    # -- commands for hosts on other nodes -----------------------------------------------------------------

    def holds(self, host_id: str) -> bool:
        return host_id in self.remote

    async def call(
        self, host_id: str, op: str, args: dict[str, Any], within: float | None, on_stream: Callable[[str], None] | None
    ) -> Result:
        """Run ``op`` on a host whose channel is on another node: its result, as the node holding it got it.
        Raises :class:`HostOffline` (or what that node's call raised, as its message), ``TimeoutError``."""
        where = self.remote.get(host_id)
        if where is None:
            raise HostOffline(OFFLINE)
        request = secrets.token_hex(12)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._replies[request] = (queue, where.node)
        doc = {"type": "call", "id": request, "host": host_id, "op": op, "args": args, "within": within,
               "reply": self.node, "stream": on_stream is not None}  # fmt: skip
        try:
            heard = await self.redis.publish(self.key("node", where.node), json.dumps(doc))
            if not heard:
                self.remote.pop(host_id, None)
                raise HostOffline(OFFLINE)
            deadline = None if within is None else time.monotonic() + within + 5
            while True:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                async with asyncio.timeout(wait):
                    reply = await queue.get()
                if "stream" in reply and on_stream is not None:
                    on_stream(reply["stream"])
                elif "result" in reply:
                    result = decode(reply["result"])
                    if not isinstance(result, Result):
                        raise HostOffline(OFFLINE)
                    return result
                elif "error" in reply:
                    raise HostOffline(reply["error"])
        except BaseException:
            if request in self._replies:
                cancel = json.dumps({"type": "cancel", "id": request})
                with contextlib.suppress(RedisError, OSError):
                    await self.redis.publish(self.key("node", where.node), cancel)
            raise
        finally:
            self._replies.pop(request, None)

    async def _serve_call(self, doc: dict[str, Any]) -> None:
        """A command from another node for a host here. Its streamed pieces go back in order, by one sender,
        and the result after the last of them."""
        reply = self.key("reply", doc["reply"])
        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        async def send() -> None:
            while (piece := await pieces.get()) is not None:
                await self._quiet(self.redis.publish(reply, piece))

        sender = asyncio.get_running_loop().create_task(send())

        def streamed(data: str) -> None:
            pieces.put_nowait(json.dumps({"id": doc["id"], "stream": data}))

        try:
            result = await self.hub.call(
                doc["host"], doc["op"], doc["args"], within=doc["within"], on_stream=streamed if doc["stream"] else None
            )
            answer = {"id": doc["id"], "result": encode(result)}
        except Exception as exc:  # (offline here too, a timeout, a refused command: the asker says it)
            answer = {"id": doc["id"], "error": str(exc) or exc.__class__.__name__}
        finally:
            self._serving.pop(doc["id"], None)
            pieces.put_nowait(None)
            await asyncio.shield(sender)
        await self._quiet(self.redis.publish(reply, json.dumps(answer)))

    # -- the listener --------------------------------------------------------------------------------------

    async def _listen(self) -> None:
        while True:
            try:
                async for message in self._pubsub.listen():
                    if message.get("type") == "message":
                        self._dispatch(message["channel"], message["data"])
            except (RedisError, OSError) as exc:
                log.warning("redis: the node's subscription broke, again in %.0fs: %s", REFRESH, exc)
                await asyncio.sleep(REFRESH)
                with contextlib.suppress(RedisError, OSError):
                    await self._pubsub.subscribe(
                        self.key("events"), self.key("node", self.node), self.key("reply", self.node)
                    )

    def _dispatch(self, channel: bytes | str, data: bytes | str) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        try:
            doc = json.loads(data)
        except ValueError:
            return
        if name == self.key("reply", self.node):
            waiting = self._replies.get(doc.get("id", ""))
            if waiting is not None:
                waiting[0].put_nowait(doc)
        elif name == self.key("node", self.node):
            if doc.get("type") == "call":
                task = asyncio.get_running_loop().create_task(self._serve_call(doc))
                self._serving[doc["id"]] = task
            elif doc.get("type") == "cancel":
                task = self._serving.pop(doc.get("id", ""), None)
                if task is not None:
                    task.cancel()
        elif doc.get("from") != self.node:
            self._event(doc)

    def _event(self, doc: dict[str, Any]) -> None:
        hub, host = self.hub, doc.get("host", "")
        kind = doc.get("type")
        if kind == "open" and host not in hub.channels:
            self.remote[host] = Remote(doc["node"], doc["user"], doc["address"])
            hub.owners[host], hub.addresses[host] = doc["user"], doc["address"]
        elif kind == "close":
            if (r := self.remote.get(host)) is not None and r.node == doc.get("node"):
                del self.remote[host]
        elif kind == "report" and host not in hub.channels:
            data = doc["data"]
            if doc["kind"] == "state":
                try:
                    data = decode(data)
                except FrameError:
                    return
            hub.reported(host, doc["user"], doc["kind"], data, relay=False)
        elif kind == "publish":
            hub.publish(doc["user"], doc["message"], relay=False)

    # -- the scheduler's lease -----------------------------------------------------------------------------

    async def leads(self) -> bool:
        """Whether this node runs the scheduler now (taking or renewing the lease); False when Redis is down."""
        try:
            value = await self._take(
                keys=[self.key("leader"), self.key("fence")], args=[self.node, str(int(LEADER_TTL * 1000))]
            )
        except (RedisError, OSError) as exc:
            log.warning("redis: cannot renew the scheduler's lease; this node does not schedule: %s", exc)
            self.token = 0
            return False
        token, _, node = (value.decode() if isinstance(value, bytes) else str(value)).partition(" ")
        mine = node == self.node
        if mine and self.token != int(token):
            log.info("this node runs the scheduler now (lease %s)", token)
        self.token = int(token) if mine else 0
        return mine

"""``dao agent enroll`` and ``dao agent run``: the host's side of the channel (``docs/agent.md``).

The identity (console URL, host ID, credential) lives in the agent's config file, mode 600, and nothing
that happens to the connection changes it. ``run`` samples the host every ``interval`` whether or not the
console is reachable (the samples wait in the outbox), and keeps one outbound WebSocket open: ``hello``
with the host's facts and the commands already done, the engine's state when an engine answers, metrics
batches until acknowledged, pongs to the console's pings. When three pings do not come the connection is
taken for half-open and dialled again, with full-jitter backoff. A refused credential (revoked) ends the
agent: dialling again would not help.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import tomllib
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from dao import __version__
from dao.agent import volumes
from dao.agent.engine_state import follow, snapshot
from dao.agent.host import Sampler, facts
from dao.agent.operations import OPERATIONS, Operation
from dao.agent.volumes import VOLUME_OPERATIONS
from dao.aio import full_jitter
from dao.channel.frames import (
    MAX_FRAME,
    Ack,
    Command,
    Frame,
    FrameError,
    Hello,
    Metrics,
    Peers,
    Ping,
    Pong,
    Result,
    Stream,
    Welcome,
    decode,
    encode,
)
from dao.channel.ledger import Ledger
from dao.channel.outbox import Outbox
from dao.engine import Engine, EngineError
from dao.errors import DaoError
from dao.paths import write_private

log = logging.getLogger("dao.agent")

RECONNECT_BASE, RECONNECT_CAP = 0.5, 30.0
CONNECT_TIMEOUT = 10.0  # seconds for one dial (TCP, TLS, the upgrade) before it counts as failed
MAX_RUNNING = 32  # commands running at once (log streams included); more are refused, not queued
STATE_SETTLE = 0.2  # seconds after an engine event before the fresh state is sent (a burst: one state)
CANCEL = "command.cancel"  # stops a running command (a log stream the page closed); args.id names it


class AgentError(DaoError):
    pass


def default_config() -> Path:
    if os.geteuid() == 0:
        return Path(os.environ.get("DAO_PREFIX", "/")) / "etc/dao/agent.toml"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "dao" / "agent.toml"


@dataclass(frozen=True, slots=True)
class Identity:
    console: str
    host: str
    credential: str
    mirror: str = ""  # the user's accelerator address, when the console gave one at enrolment

    @classmethod
    def load(cls, path: Path) -> Identity:
        try:
            doc = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise AgentError(
                f"{path} does not exist", hint="enrol first: dao agent enroll --console URL --token T"
            ) from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise AgentError(f"cannot read {path}: {exc}") from None
        try:
            return cls(str(doc["console"]), str(doc["host"]), str(doc["credential"]), str(doc.get("mirror", "")))
        except KeyError as exc:
            raise AgentError(f"{path} has no {exc.args[0]}: enrol again") from None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A JSON string is a TOML basic string: a URL with a quote or a backslash stays one value.
        values = {"console": self.console, "host": self.host, "credential": self.credential}
        if self.mirror:
            values["mirror"] = self.mirror
        write_private(path, "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))


async def enroll(console: str, token: str, path: Path, name: str | None = None) -> Identity:
    console = console.rstrip("/")
    body = {"token": token, "name": name or facts()["hostname"]}
    try:
        async with (
            aiohttp.ClientSession(trust_env=True) as session,
            session.post(f"{console}/api/agent/enroll", json=body, timeout=aiohttp.ClientTimeout(total=30)) as resp,
        ):
            doc = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise AgentError(f"cannot enrol with {console}: {exc.__class__.__name__}: {exc}") from None
    if resp.status != 200 or not isinstance(doc, dict) or "credential" not in doc:
        why = doc.get("error") if isinstance(doc, dict) else None
        raise AgentError(f"{console} refused the enrolment: {why or resp.status}")
    mirror = doc.get("mirror") if isinstance(doc.get("mirror"), str) else ""
    identity = Identity(console, str(doc["host"]), str(doc["credential"]), mirror)
    identity.save(path)
    return identity


def channel_proxy(url: str) -> str | None:
    """The proxy for the channel, as for any HTTP(S) client on the host: ``WSS_PROXY``, else ``HTTPS_PROXY``
    for ``wss://`` (``WS_PROXY``, else ``HTTP_PROXY`` for ``ws://``), none for a ``NO_PROXY`` host. aiohttp
    alone would look only at the ``WS*`` variables for a WebSocket, and HTTPS_PROXY is what a firewalled
    host has."""
    split = urlsplit(url)
    if split.hostname and urllib.request.proxy_bypass(split.hostname):
        return None
    proxies = urllib.request.getproxies()
    secure = split.scheme == "wss"
    return proxies.get("wss" if secure else "ws") or proxies.get("https" if secure else "http")


class Agent:
    def __init__(
        self,
        identity: Identity,
        state_dir: Path,
        interval: float = 10.0,
        operations: dict[str, Operation] | None = None,
        extra_facts: Callable[[], dict[str, object]] | None = None,
        report_engine: bool = True,
        on_peers: Callable[[Peers], None] | None = None,
    ) -> None:
        """``operations``: what this agent runs for the console (a capsule provider's are its own);
        ``extra_facts``: more to say in each hello; ``report_engine``: follow the local engine (a provider
        has none to report); ``on_peers``: told what the console says of the user's peers (the local
        accelerator's)."""
        self.report_engine = report_engine
        self.on_peers = on_peers
        self.identity = identity
        self.operations = {**OPERATIONS, **VOLUME_OPERATIONS} if operations is None else operations
        self.extra_facts = extra_facts
        volumes.TRANSFERS = state_dir / "transfers"
        self.interval = interval
        self.outbox = Outbox()
        self.ledger = Ledger(state_dir / "commands.json")
        self.sampler = Sampler()
        self._sampled = asyncio.Event()
        self._ws: aiohttp.ClientWebSocketResponse | None = None  # the open channel, when there is one
        self._running: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        sampling = asyncio.get_running_loop().create_task(self._sample())
        try:
            attempt = 0
            # A dial into a dead link must give up and try again, not wait out the kernel's SYN retries.
            timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT, sock_connect=CONNECT_TIMEOUT)
            async with aiohttp.ClientSession(trust_env=True, timeout=timeout) as session:
                while True:
                    welcomed = await self._connect(session)
                    attempt = 0 if welcomed else attempt + 1
                    wait = full_jitter(attempt, RECONNECT_BASE, RECONNECT_CAP)
                    log.info("channel closed; dialling again in %.1f s", wait)
                    await asyncio.sleep(wait)
        finally:
            sampling.cancel()
            for task in self._running.values():
                task.cancel()

    async def _sample(self) -> None:
        while True:
            self.outbox.add(self.sampler.sample())
            self._sampled.set()
            await asyncio.sleep(self.interval)

    async def _connect(self, session: aiohttp.ClientSession) -> bool:
        """One connection, until it ends; True when the console welcomed us."""
        url = self.identity.console.replace("http", "ws", 1) + "/api/agent/channel"
        headers = {"Authorization": f"Bearer {self.identity.credential}"}
        proxy = channel_proxy(url)
        try:
            async with session.ws_connect(
                url, headers=headers, max_msg_size=MAX_FRAME, heartbeat=None, proxy=proxy
            ) as ws:
                await ws.send_str(encode(Hello(__version__, await self._facts(), self.ledger.ids())))
                welcome = decode((await ws.receive(timeout=30)).data)
                if not isinstance(welcome, Welcome):
                    log.warning("the console did not welcome us: %s", welcome.kind)
                    return False
                log.info("connected to %s as host %s", self.identity.console, welcome.host)
                self._ws = ws
                try:
                    await self._session(ws, welcome.ping_interval)
                finally:
                    self._ws = None
                return True
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                raise AgentError("the console refuses this host's credential (revoked?)", hint="enrol again") from None
            log.warning("cannot open the channel: %s", exc)
        except (aiohttp.ClientError, TimeoutError, FrameError, TypeError, ConnectionError) as exc:
            log.warning("channel to %s: %s: %s", self.identity.console, exc.__class__.__name__, exc)
        return False

    async def _facts(self) -> dict[str, object]:
        """The host's facts, with its engine's version when the engine answers."""
        found: dict[str, object] = dict(facts())
        if self.extra_facts is not None:
            found.update(self.extra_facts())
        with contextlib.suppress(EngineError, TimeoutError):
            async with asyncio.timeout(5), Engine() as engine:
                found["docker"] = (await engine.negotiate()).server_version
        return found

    async def _send(self, frame: Frame) -> None:
        """On the open channel; with none (or a broken one) the frame is dropped: results wait in the ledger
        for the console to ask again, metrics in the outbox."""
        ws = self._ws
        if ws is None or ws.closed:
            return
        try:
            text = encode(frame)
        except FrameError as exc:  # an answer too big for a frame is an answer that it was
            if not isinstance(frame, Result):
                raise
            text = encode(Result(frame.id, False, str(exc)))
        with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
            await ws.send_str(text)

    async def _session(self, ws: aiohttp.ClientWebSocketResponse, ping_interval: float) -> None:
        heard = time.monotonic()
        changed = asyncio.Event()

        following: list[Engine] = []  # the engine whose events are followed: the fresh states come from it too

        async def follow_engine() -> None:
            """The state on connect, then each engine event as it happens (and a fresh state after it)."""
            while not ws.closed:
                try:
                    async with Engine() as engine:
                        await engine.negotiate()
                        following[:] = [engine]
                        try:
                            since = time.time()
                            await self._send(await snapshot(engine))
                            async for event in follow(engine, since=since):
                                await self._send(event)
                                changed.set()
                        finally:
                            following.clear()
                except EngineError as exc:
                    log.info("no engine state to report: %s", exc)
                await asyncio.sleep(self.interval)

        async def send_state() -> None:
            while not ws.closed:
                await changed.wait()
                await asyncio.sleep(STATE_SETTLE)
                changed.clear()
                if following:
                    with contextlib.suppress(EngineError):
                        await self._send(await snapshot(following[0]))

        async def send_metrics() -> None:
            sent = 0
            while not ws.closed:
                last, batch = self.outbox.batch(after=sent)
                if batch:
                    await ws.send_str(encode(Metrics(last, batch)))
                    sent = last
                    continue
                self._sampled.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ping_interval):
                        await self._sampled.wait()

        async def watchdog() -> None:
            while not ws.closed:
                await asyncio.sleep(ping_interval)
                if time.monotonic() - heard > 3 * ping_interval:
                    log.warning("no ping for 3 intervals: the channel is half-open; closing it")
                    await ws.close()
                    return

        jobs = (follow_engine, send_state, send_metrics, watchdog) if self.report_engine else (send_metrics, watchdog)
        tasks = [asyncio.ensure_future(t()) for t in jobs]
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                frame = decode(msg.data)
                heard = time.monotonic()
                if isinstance(frame, Ping):
                    await ws.send_str(encode(Pong(frame.at)))
                elif isinstance(frame, Ack):
                    self.outbox.ack(frame.seq)
                elif isinstance(frame, Command):
                    await self._command(frame)
                elif isinstance(frame, Peers) and self.on_peers is not None:
                    self.on_peers(frame)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _command(self, command: Command) -> None:
        """At most once. A command seen before is not run again: a running one will send its result when it
        ends, an ended one gets its recorded result. A new one runs in a task of its own, so a log stream
        does not hold up the pings."""
        if command.op == CANCEL:
            target = self._running.get(str(command.args.get("id")))
            if target is not None:
                target.cancel()
            await self._send(Result(command.id, True, {"cancelled": target is not None}))
            return
        if command.id in self._running:
            return
        if not self.ledger.begin(command.id):
            known = self.ledger.result(command.id) or {"ok": False, "data": "unknown"}
            await self._send(Result(command.id, bool(known["ok"]), known["data"]))
            return
        operation = self.operations.get(command.op)
        if operation is None or len(self._running) >= MAX_RUNNING:
            why = f"unknown operation {command.op[:60]!r}" if operation is None else "too many commands running"
            self.ledger.end(command.id, False, why)
            await self._send(Result(command.id, False, why))
            return

        async def run() -> None:
            try:
                ok, data = True, await operation(command.args, lambda text: self._send(Stream(command.id, text)))
            except asyncio.CancelledError:
                ok, data = False, "cancelled"
            except DaoError as exc:
                ok, data = False, exc.message
            except Exception as exc:  # an operation's bug must not end the agent; the console hears of it
                log.exception("%s %s failed", command.op, command.id)
                ok, data = False, f"internal error: {exc.__class__.__name__}"
            finally:
                self._running.pop(command.id, None)
            self.ledger.end(command.id, ok, data)
            await self._send(Result(command.id, ok, data))

        self._running[command.id] = asyncio.get_running_loop().create_task(run())

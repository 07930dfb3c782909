"""The reconcile loop: the I/O around :func:`dao.console.scheduler.place.decide`. Every ``interval`` it
builds each app owner's desired state (their apps), actual state (the ``dao.*``-labelled containers their
agents report) and hosts (the store's, with the agents' live reports), asks for a decision, and carries it
out through the agents: ``container.run`` for a start, ``container.remove`` (forced) for a removal.

A ready replica that another one replaces (a rolling update, a move off a capsule) *drains* first: for
``DRAIN`` seconds it is out of the app's endpoints while it still serves, so a client that follows the
endpoints never meets a replica that has just gone. A stateful replica's move is its own sequence
(:meth:`Reconciler._move`): the new replica made (its image pulled) but not started, the old one stopped,
its named volumes copied through the console, the new one started. The downtime is the stop, the copy and
the start; the old replica's containers are left alone while the move is under way, and a move that fails
starts the old one again.

A start in flight, or just done and not yet in the host's reported state, is not started again; one that
failed waits before it is tried again (doubling, to a minute), and its error is what the app's page shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

from dao.console.apps.compose import App, Service
from dao.console.apps.store import Apps
from dao.console.capsules import Capsules
from dao.console.hub import Hub
from dao.console.scheduler.place import Host, Pending, Replica, Start, Want, decide
from dao.console.store import Store
from dao.errors import DaoError

log = logging.getLogger("dao.console.scheduler")

SETTLE = 5.0  # seconds a finished start is still counted as in flight (its state may lag)
RETRY_MAX = 60.0
DRAIN = 3.0  # seconds a replaced replica is out of the endpoints before it is removed
STOP_GRACE = 10  # seconds a moving stateful replica has to stop before it is killed
AUTO_CAPSULE_EVERY = 300.0  # seconds between capsules made for one user whose replicas have nowhere to go


_APP_OF = re.compile(r"dao-([0-9a-f]{12})-")  # the app ID in a replica's container name


def spec_hash(service: Service) -> str:
    return hashlib.sha256(json.dumps(asdict(service), sort_keys=True, default=str).encode()).hexdigest()[:12]


def container_name(app_id: str, service: str, index: int, spec: str) -> str:
    return f"dao-{app_id}-{service}-{index}-{spec[:8]}"


def run_args(app_id: str, app_name: str, app: App, service: Service, index: int, spec: str) -> dict[str, Any]:
    """The ``container.run`` arguments of one replica."""
    check = service.healthcheck
    return {
        "name": container_name(app_id, service.name, index, spec),
        "image": service.image,
        "command": list(service.command) if isinstance(service.command, tuple) else service.command,
        "env": [f"{k}={v}" for k, v in service.environment],
        "ports": [{"container": p.container, "host": p.host, "protocol": p.protocol} for p in service.ports],
        "mounts": [
            {"volume": f"dao-{app_id}-{m.volume}", "target": m.target, "read_only": m.read_only} for m in service.mounts
        ],
        "restart": service.restart,
        "healthcheck": None
        if check is None
        else {
            "test": list(check.test),
            "interval": check.interval,
            "timeout": check.timeout,
            "retries": check.retries,
            "start_period": check.start_period,
        },
        "cpus_limit": service.cpus_limit,
        "memory_limit": service.memory_limit,
        "pull_policy": service.pull_policy,
        "labels": {
            "dao.app": app_id,
            "dao.app.name": app_name,
            "dao.service": service.name,
            "dao.replica": str(index),
            "dao.spec": spec,
        },
    }


@dataclass
class Tried:
    until: float  # not again before this
    wait: float
    error: str | None = None


class Reconciler:
    def __init__(
        self,
        store: Store,
        apps: Apps,
        hub: Hub,
        *,
        interval: float = 2.0,
        host_grace: float = 60.0,
        expiry_lead: float = 600.0,
        min_ready: float = 5.0,
        capsules: Capsules | None = None,
        console_url: str = "",
    ) -> None:
        """``capsules``: where expiry times come from, and where a user whose replicas must leave an
        expiring host with nowhere to go gets a new capsule (whose agents dial ``console_url``)."""
        self.store, self.apps, self.hub = store, apps, hub
        self.capsules, self.console_url = capsules, console_url
        self.draining: dict[tuple[str, str], float] = {}  # (host, container) -> since when
        self.busy: set[str] = set()  # containers a move is working on: no removal touches them
        self.auto_capsule: dict[str, float] = {}  # user -> when a capsule was last made for their replicas
        self.names: dict[str, str] = {}  # host ID -> name, for the apps' events
        self.min_ready = min_ready
        self.interval, self.host_grace, self.expiry_lead = interval, host_grace, expiry_lead
        self.tried: dict[tuple[str, str, int], Tried] = {}  # (app, service, index) -> last try
        self.pending: dict[str, list[Pending]] = {}  # app ID -> what cannot be placed, and why
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                if self.hub.relay is not None and not await self.hub.relay.leads():
                    continue  # another console node runs the scheduler (under the lease)
                owners = await asyncio.to_thread(self.apps.owners)
                owners |= self._running_for()  # a deleted app's replicas: their owner has no app left
                for user in owners:
                    await self.once(user)
            except Exception:  # one bad round must not end the loop
                log.exception("reconcile")

    async def once(self, user_id: str) -> None:
        rows = await asyncio.to_thread(self.apps.list, user_id)
        stored = await asyncio.to_thread(self.store.hosts, user_id)
        stored = [h for h in stored if "provider" not in h["facts"]]  # a capsule provider runs no apps itself
        self.names.update({h["id"]: h["name"] for h in stored})
        now = time.time()
        wants: list[Want] = []
        parsed: dict[str, tuple[dict[str, Any], App]] = {}
        for row in rows:
            app = self.apps.parsed(row["compose"])
            parsed[row["id"]] = (row, app)
            count = self.apps.wanted(row)
            for service in app.services.values():
                wants.append(
                    Want(
                        row["id"],
                        service.name,
                        count[service.name],
                        spec_hash(service),
                        service.constraints,
                        service.cpus,
                        service.memory,
                        stateful=bool(service.mounts),
                    )
                )
        ends = self.capsules.ends if self.capsules else {}  # (kept in memory by Capsules, as the pages read it)
        hosts = [self._host(h, now, ends.get(h["id"])) for h in stored]
        replicas = self.replicas_of({h.id for h in hosts})
        decision = decide(wants, replicas, hosts, now, host_grace=self.host_grace, expiry_lead=self.expiry_lead)
        self.pending = {k: v for k, v in self.pending.items() if k not in parsed}
        for app_id in parsed:
            self.pending[app_id] = [p for p in decision.pending if p.app == app_id]
        for start in decision.start:
            key = (start.app, start.service, start.index)
            tried = self.tried.get(key)
            if tried is not None and tried.until > now:
                continue
            row, app = parsed[start.app]
            args = run_args(start.app, row["name"], app, app.services[start.service], start.index, start.spec)
            self._spawn(self._start(key, start, args, tried))
        draining = {}
        for remove in decision.remove:
            if remove.container in self.busy:
                continue
            spot = (remove.host, remove.container)
            if remove.drain:
                since = draining[spot] = self.draining.get(spot, now)
                if now - since < DRAIN:
                    continue
            self._spawn(self._remove(remove.host, remove.container, remove.why))
        self.draining = {k: v for k, v in self.draining.items() if k[0] not in {h.id for h in hosts}} | draining
        if any(p.moving for p in decision.pending):
            await self._new_capsule(user_id, now)

    async def _new_capsule(self, user_id: str, now: float) -> None:
        """Replicas must leave an expiring host and no host of the user can take them: a capsule can."""
        if self.capsules is None or now - self.auto_capsule.get(user_id, 0.0) < AUTO_CAPSULE_EVERY:
            return
        self.auto_capsule[user_id] = now

        async def make() -> None:
            try:
                made = await self.capsules.create(user_id, self.console_url)  # type: ignore[union-attr]
                log.info("capsule %s made for %s: replicas had nowhere to go", made["id"], user_id)
            except DaoError as exc:
                log.warning("no capsule for %s's moving replicas: %s", user_id, exc.message)

        self._spawn(make())

    def is_draining(self, host_id: str, container: str) -> bool:
        return (host_id, container) in self.draining

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self, key: tuple[str, str, int], start: Start, args: dict[str, Any], before: Tried | None) -> None:
        wait = min((before.wait * 2) if before else 2.0, RETRY_MAX)
        self.tried[key] = Tried(float("inf"), wait)  # in flight
        error = None
        try:
            if start.move_from is not None:
                await self._move(start.move_from, start.host, args)
            else:
                result = await self.hub.call(start.host, "container.run", args, within=600)
                if not result.ok:
                    error = str(result.data)
        except DaoError as exc:
            error = exc.message
        where = self.names.get(start.host, start.host)
        if error is None:
            self.tried[key] = Tried(time.time() + SETTLE, 2.0)
            log.info("started %s on %s", args["name"], start.host)
            if start.move_from is None:
                await self._event(start.app, f"{start.service} #{start.index} started on {where}")
        else:
            self.tried[key] = Tried(time.time() + wait, wait, error)
            log.warning("cannot start %s on %s: %s", args["name"], start.host, error)
            if before is None or before.error != error:  # (a retry failing the same way is no news)
                await self._event(start.app, f"{start.service} #{start.index} cannot start on {where}: {error}")

    async def _event(self, app_id: str, text: str) -> None:
        with contextlib.suppress(Exception):  # the app may be gone; an event is never worth a failed round
            await asyncio.to_thread(self.apps.add_event, app_id, text)

    async def _call(self, host: str, op: str, args: dict[str, Any], within: float = 120) -> Any:
        result = await self.hub.call(host, op, args, within=within)
        if not result.ok:
            raise DaoError(f"{op} on {host}: {result.data}")
        return result.data

    async def _move(self, old: Replica, host: str, args: dict[str, Any]) -> None:
        """A stateful replica to ``host``: made there (its image pulled) while the old one still runs, then
        the old one stopped, each named volume copied (a final copy: nothing is written after it), and the
        new one started. On failure the new one goes and the old one starts again."""
        name = args["name"]
        self.busy |= {old.container, name}
        began = time.monotonic()
        stopped = None
        try:
            await self._call(host, "container.run", {**args, "start": False}, within=600)
            stopped = time.monotonic()
            await self._call(old.host, "container.stop", {"id": old.container, "grace": STOP_GRACE})
            copied = 0
            for mount in args["mounts"]:
                copied += await self._copy_volume(old, host, name, mount["target"])
            await self._call(host, "container.start", {"id": name})
            down = time.monotonic() - stopped
            log.info(
                "moved %s from %s to %s in %.1f s: down %.1f s, %d bytes of volumes copied",
                name, old.host, host, time.monotonic() - began, down, copied,
            )  # fmt: skip
            await self._event(
                old.app,
                f"{old.service} #{old.index} moved from {self.names.get(old.host, old.host)} to "
                f"{self.names.get(host, host)} with its volumes ({copied} bytes): down {down:.1f} s",
            )
        except BaseException:
            with contextlib.suppress(DaoError):
                await self._call(host, "container.remove", {"id": name, "force": True})
            if stopped is not None:
                with contextlib.suppress(DaoError):
                    await self._call(old.host, "container.start", {"id": old.container})
            raise
        finally:
            self.busy -= {old.container, name}

    async def _copy_volume(self, old: Replica, host: str, container: str, path: str) -> int:
        """One volume's tar stream from the old replica to the new one, a piece at a time (``dao.agent.volumes``)."""
        saved = await self._call(old.host, "volume.save", {"id": old.container, "path": path}, within=600)
        transfer, offset = saved["transfer"], 0
        try:
            while True:
                piece = await self._call(old.host, "volume.read", {"transfer": transfer, "offset": offset})
                data = piece["data"]
                if data or offset == 0:
                    wrote = await self._call(
                        host, "volume.write", {"transfer": transfer, "offset": offset, "data": data}
                    )
                    offset = wrote["size"]
                if piece["end"]:
                    break
            await self._call(
                host,
                "volume.restore",
                {"transfer": transfer, "id": container, "path": path, "size": saved["size"], "sha256": saved["sha256"]},
                within=600,
            )
        finally:
            with contextlib.suppress(DaoError):
                await self._call(old.host, "volume.drop", {"transfer": transfer})
        return int(saved["size"])

    async def _remove(self, host: str, container: str, why: str) -> None:
        with contextlib.suppress(DaoError):
            result = await self.hub.call(host, "container.remove", {"id": container, "force": True}, within=120)
            log.info("removed %s on %s (%s): %s", container, host, why, "ok" if result.ok else result.data)
            app = _APP_OF.match(container)
            if result.ok and app:
                await self._event(app.group(1), f"{container} removed from {self.names.get(host, host)}: {why}")

    def _host(self, h: dict[str, Any], now: float, expires_at: float | None = None) -> Host:
        metrics = h.get("metrics") or {}
        cpus = float(h["facts"].get("cpus") or 1)
        online = bool(h["online"]) and self.hub.is_open(h["id"])
        return Host(
            h["id"],
            name=h["name"],
            labels=h.get("labels") or {},
            online=online,
            offline_since=None if online else (h.get("last_seen") or 0.0),
            expires_at=expires_at,
            cpus=cpus,
            cpu_used=cpus * float(metrics.get("cpu") or 0) / 100,
            mem_total=int(metrics.get("mem_total") or h["facts"].get("mem_total") or 0),
            mem_used=int(metrics.get("mem_used") or 0),
        )

    def replicas_of(self, host_ids: set[str]) -> list[Replica]:
        out = []
        for host_id in host_ids:
            live = self.hub.live.get(host_id)
            for c in live.state.containers if live and live.state else []:
                labels = c.get("labels") or {}
                if "dao.app" not in labels or not str(labels.get("dao.replica", "")).isdigit():
                    continue
                running = c.get("state") == "running"
                status = str(c.get("status") or "")
                created = float(c.get("created") or 0)
                if "(healthy)" in status:
                    ready = running
                elif "health" in status:  # (health: starting), (unhealthy)
                    ready = False
                else:  # no healthcheck: it has kept running for --min-ready
                    ready = running and time.time() - created >= self.min_ready
                out.append(
                    Replica(
                        str(c.get("name") or c.get("id")),
                        host_id,
                        labels["dao.app"],
                        labels.get("dao.service", ""),
                        int(labels["dao.replica"]),
                        labels.get("dao.spec", ""),
                        running=running,
                        created=created,
                        ready=ready,
                    )
                )
        return out

    def _running_for(self) -> set[str]:
        """The users with app replicas on their hosts, whatever apps they have."""
        users = set()
        for host_id, live in self.hub.live.items():
            if live.state and any("dao.app" in (c.get("labels") or {}) for c in live.state.containers):
                owner = self.hub.owners.get(host_id)
                if owner is not None:
                    users.add(owner)
        return users

    def errors(self, app_id: str) -> dict[str, str]:
        """The last error of each of the app's replicas that failed to start: "service/index" -> message."""
        return {f"{s}/{i}": t.error for (a, s, i), t in self.tried.items() if a == app_id and t.error}

"""The reconcile loop: the I/O around :func:`dao.console.scheduler.place.decide`. Every ``interval`` it
builds each app owner's desired state (their apps), actual state (the ``dao.*``-labelled containers their
agents report) and hosts (the store's, with the agents' live reports), asks for a decision, and carries it
out through the agents: ``container.run`` for a start, ``container.remove`` (forced) for a removal.

A start in flight, or just done and not yet in the host's reported state, is not started again; one that
failed waits before it is tried again (doubling, to a minute), and its error is what the app's page shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from dao.console.apps.compose import App, Service
from dao.console.apps.store import Apps
from dao.console.hub import Hub
from dao.console.scheduler.place import Host, Pending, Replica, Start, Want, decide
from dao.console.store import Store
from dao.errors import DaoError

log = logging.getLogger("dao.console.scheduler")

SETTLE = 5.0  # seconds a finished start is still counted as in flight (its state may lag)
RETRY_MAX = 60.0


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
    ) -> None:
        self.store, self.apps, self.hub = store, apps, hub
        self.min_ready = min_ready
        self.interval, self.host_grace, self.expiry_lead = interval, host_grace, expiry_lead
        self.tried: dict[tuple[str, str, int], Tried] = {}  # (app, service, index) -> last try
        self.pending: dict[str, list[Pending]] = {}  # app ID -> what cannot be placed, and why
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                owners = await asyncio.to_thread(self.apps.owners)
                owners |= self._running_for()  # a deleted app's replicas: their owner has no app left
                for user in owners:
                    await self.once(user)
            except Exception:  # one bad round must not end the loop
                log.exception("reconcile")

    async def once(self, user_id: str) -> None:
        rows = await asyncio.to_thread(self.apps.list, user_id)
        stored = await asyncio.to_thread(self.store.hosts, user_id)
        now = time.time()
        wants: list[Want] = []
        parsed: dict[str, tuple[dict[str, Any], App]] = {}
        for row in rows:
            app = self.apps.parsed(row["compose"])
            parsed[row["id"]] = (row, app)
            for service in app.services.values():
                wants.append(
                    Want(
                        row["id"],
                        service.name,
                        service.replicas,
                        spec_hash(service),
                        service.constraints,
                        service.cpus,
                        service.memory,
                    )
                )
        hosts = [self._host(h, now) for h in stored]
        replicas = self._replicas({h.id for h in hosts})
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
        for remove in decision.remove:
            self._spawn(self._remove(remove.host, remove.container, remove.why))

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self, key: tuple[str, str, int], start: Start, args: dict[str, Any], before: Tried | None) -> None:
        wait = min((before.wait * 2) if before else 2.0, RETRY_MAX)
        self.tried[key] = Tried(float("inf"), wait)  # in flight
        error = None
        try:
            result = await self.hub.call(start.host, "container.run", args, within=600)
            if not result.ok:
                error = str(result.data)
        except DaoError as exc:
            error = exc.message
        if error is None:
            self.tried[key] = Tried(time.time() + SETTLE, 2.0)
            log.info("started %s on %s", args["name"], start.host)
        else:
            self.tried[key] = Tried(time.time() + wait, wait, error)
            log.warning("cannot start %s on %s: %s", args["name"], start.host, error)

    async def _remove(self, host: str, container: str, why: str) -> None:
        with contextlib.suppress(DaoError):
            result = await self.hub.call(host, "container.remove", {"id": container, "force": True}, within=120)
            log.info("removed %s on %s (%s): %s", container, host, why, "ok" if result.ok else result.data)

    def _host(self, h: dict[str, Any], now: float) -> Host:
        metrics = h.get("metrics") or {}
        cpus = float(h["facts"].get("cpus") or 1)
        online = bool(h["online"]) and h["id"] in self.hub.channels
        return Host(
            h["id"],
            name=h["name"],
            labels=h.get("labels") or {},
            online=online,
            offline_since=None if online else (h.get("last_seen") or 0.0),
            cpus=cpus,
            cpu_used=cpus * float(metrics.get("cpu") or 0) / 100,
            mem_total=int(metrics.get("mem_total") or h["facts"].get("mem_total") or 0),
            mem_used=int(metrics.get("mem_used") or 0),
        )

    def _replicas(self, host_ids: set[str]) -> list[Replica]:
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

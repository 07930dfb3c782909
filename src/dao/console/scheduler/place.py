"""The scheduler's decisions, as a pure function of the desired state (the apps' services), the actual state
(the replicas the agents report, by their ``dao.*`` labels) and the hosts (``docs/apps.md``). No I/O: the
console's reconcile loop carries the decisions out, as ``dao clean`` separates deciding from removing.

The rules:
- only the owner's online hosts are targets; never one that expires within ``expiry_lead``; a service's
  constraints on labels, hostname or ID must hold; the reservations must fit the host's free CPU and
  memory (as its agent last reported them, less what this decision already placed there);
- replicas of one service spread: the host with the fewest of them first, then the most free memory, then
  the host ID (so the same input gives the same answer);
- a replica on a host offline for longer than ``host_grace`` is lost: it is placed again elsewhere. When that
  host comes back, its copy is extra and removed (the replacement stays);
- a replica index beyond ``replicas``, a replica of an app that is gone, a second copy of one index: removed;
- a replica that cannot be placed is *pending*, with the reason, and placed nowhere;
- a replica on a host that expires within ``expiry_lead`` (a capsule) moves, make-before-break: a copy starts
  on another host and the old one goes once the copy is ready. A stateful one (named volumes) cannot run
  twice: its start carries ``move_from``, and the loop stops the old one, copies its volumes, then starts it;
- when one replica has two copies, the one to keep is on a host that is not expiring, then the newest running
  one; the other goes once the kept one is ready (a ready one that is replaced drains first);
- a new spec rolls out one replica at a time per service, make-before-break: a replica of the new spec
  starts beside the old one, and the old one is removed only once the new one is ready (healthy, or running
  for ``--min-ready``). One that never gets ready holds the update there, and the old replicas keep serving.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from dao.console.apps.compose import Constraint


@dataclass(frozen=True, slots=True)
class Host:
    id: str
    name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    online: bool = True
    offline_since: float | None = None  # when its channel closed (None: online, or never seen)
    expires_at: float | None = None  # a capsule's end
    cpus: float = 1.0
    cpu_used: float = 0.0  # CPUs busy (the agent's cpu % times cpus)
    mem_total: int = 0
    mem_used: int = 0


@dataclass(frozen=True, slots=True)
class Want:
    """One service of one app, as the scheduler needs it."""

    app: str
    service: str
    replicas: int
    spec: str  # a hash of the service's spec: a replica with another one is from an older version
    constraints: tuple[Constraint, ...] = ()
    cpus: float = 0.0
    memory: int = 0
    stateful: bool = False  # it has named volumes: moved by stop, copy, start (not two at once)


@dataclass(frozen=True, slots=True)
class Replica:
    """A container an agent reports, by its labels ``dao.app``, ``dao.service``, ``dao.replica``, ``dao.spec``."""

    container: str
    host: str
    app: str
    service: str
    index: int
    spec: str
    running: bool = True
    created: float = 0.0
    ready: bool = True  # running and healthy (its healthcheck passes, or it has run for --min-ready)


@dataclass(frozen=True, slots=True)
class Start:
    app: str
    service: str
    index: int
    host: str
    spec: str
    move_from: Replica | None = None  # a stateful replica leaving an expiring host: its volumes come along


@dataclass(frozen=True, slots=True)
class Remove:
    container: str
    host: str
    why: str
    drain: bool = False  # a ready replica another one replaces: out of the endpoints a while before it goes


@dataclass(frozen=True, slots=True)
class Pending:
    app: str
    service: str
    index: int
    why: str
    moving: bool = False  # it runs on a host about to expire and has nowhere to go


@dataclass
class Decision:
    start: list[Start] = field(default_factory=list)
    remove: list[Remove] = field(default_factory=list)
    pending: list[Pending] = field(default_factory=list)


def decide(
    wants: Iterable[Want],
    replicas: Iterable[Replica],
    hosts: Iterable[Host],
    now: float,
    *,
    host_grace: float = 60.0,
    expiry_lead: float = 600.0,
) -> Decision:
    hosts_by_id = {h.id: h for h in hosts}
    decision = Decision()
    wanted = {(w.app, w.service): w for w in wants}

    def expiring(host_id: str) -> bool:
        host = hosts_by_id.get(host_id)
        return host is not None and host.expires_at is not None and host.expires_at - now <= expiry_lead

    def gone(host_id: str) -> bool:
        host = hosts_by_id.get(host_id)
        if host is None:
            return True
        return not host.online and host.offline_since is not None and now - host.offline_since > host_grace

    # What stands now: per (app, service, index), the copies that count (on a live host, or one within grace).
    held: dict[tuple[str, str, int], list[Replica]] = defaultdict(list)
    for r in replicas:
        want = wanted.get((r.app, r.service))
        if want is None:
            decision.remove.append(Remove(r.container, r.host, f"app {r.app} has no service {r.service} now"))
        elif r.index >= want.replicas:
            decision.remove.append(Remove(r.container, r.host, f"{r.service} is scaled to {want.replicas}"))
        else:
            held[(r.app, r.service, r.index)].append(r)

    free_mem: dict[str, int] = {}
    free_cpu: dict[str, float] = {}
    for h in hosts_by_id.values():
        free_mem[h.id] = max(h.mem_total - h.mem_used, 0)
        free_cpu[h.id] = max(h.cpus - h.cpu_used, 0.0)
    count: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))  # service -> host -> n

    missing: list[tuple[Want, int, Replica | None]] = []  # (service, index, the copy that must move)
    stale: list[tuple[Want, int]] = []  # replicas of an older spec with no new one beside them yet
    updating: set[tuple[str, str]] = set()  # services with a new-spec replica not yet ready
    for want in wanted.values():
        key = (want.app, want.service)
        for index in range(want.replicas):
            copies = held.get((want.app, want.service, index), [])
            alive = [c for c in copies if not gone(c.host)]
            if not alive:
                missing.append((want, index, None))
                continue
            current = [c for c in alive if c.spec == want.spec]
            older = [c for c in alive if c.spec != want.spec]
            # Two copies of one spec for one index: a host that was away came back after its replica was placed
            # again, or a replica moving off an expiring host. The one on a lasting host stays, the newest first.
            keep = min(current or older, key=lambda c: (expiring(c.host), not c.running, -c.created, c.host))
            count[key][keep.host] += 1
            for extra in current or older:
                if extra is keep or not _online(hosts_by_id, extra.host):
                    continue
                if keep.ready or not (extra.running and extra.ready):
                    why = "moved off a host about to expire" if expiring(extra.host) else "a second copy of one replica"
                    decision.remove.append(Remove(extra.container, extra.host, why, drain=extra.ready))
            if expiring(keep.host):
                if not (want.stateful and not keep.running):  # (a stopped stateful one: its move is under way)
                    missing.append((want, index, keep))
                continue
            if not older or not current:
                if older:
                    stale.append((want, index))
                continue
            # A rolling update: the new replica runs beside the old one until it is ready, then the old goes.
            if keep.ready:
                for c in older:
                    if _online(hosts_by_id, c.host):
                        why = "replaced by its new spec, now ready"
                        decision.remove.append(Remove(c.container, c.host, why, drain=c.ready))
            else:
                updating.add(key)
    for want, index in stale:  # one new replica at a time per service; a failing one holds the rest back
        key = (want.app, want.service)
        if key not in updating:
            updating.add(key)
            missing.append((want, index, None))

    # Place the missing ones, service by service, each from a heap of its eligible hosts.
    by_service: dict[tuple[str, str], list[tuple[int, Replica | None]]] = defaultdict(list)
    wants_of: dict[tuple[str, str], Want] = {}
    for want, index, leaving in missing:
        by_service[(want.app, want.service)].append((index, leaving))
        wants_of[(want.app, want.service)] = want
    targets = [
        h for h in hosts_by_id.values() if h.online and (h.expires_at is None or h.expires_at - now > expiry_lead)
    ]
    for key, indexes in by_service.items():
        want = wants_of[key]
        eligible = [h for h in targets if all(c.holds(h.labels, h.name, h.id) for c in want.constraints)]
        if not eligible:
            why = _no_host_why(want, targets)
            decision.pending += [Pending(want.app, want.service, i, why, r is not None) for i, r in indexes]
            continue
        counts = count[key]
        heap = [(counts[h.id], -free_mem[h.id], h.id) for h in eligible]
        heapq.heapify(heap)
        skipped: list[tuple[int, int, str]] = []
        for index, leaving in indexes:
            placed = None
            while heap:
                n, _, host_id = heapq.heappop(heap)
                if free_mem[host_id] >= want.memory and free_cpu[host_id] >= want.cpus:
                    placed = host_id
                    break
                skipped.append((n, -free_mem[host_id], host_id))  # full for this service, not for others
            if placed is None:
                why = f"no host has {_fmt(want)} free"
                decision.pending.append(Pending(want.app, want.service, index, why, leaving is not None))
                continue
            moving = leaving if want.stateful else None
            decision.start.append(Start(want.app, want.service, index, placed, want.spec, moving))
            free_mem[placed] -= want.memory
            free_cpu[placed] -= want.cpus
            counts[placed] += 1
            heapq.heappush(heap, (counts[placed], -free_mem[placed], placed))
    return decision


def _online(hosts: dict[str, Host], host_id: str) -> bool:
    host = hosts.get(host_id)
    return host is not None and host.online


def _fmt(want: Want) -> str:
    parts = []
    if want.cpus:
        parts.append(f"{want.cpus:g} CPUs")
    if want.memory:
        parts.append(f"{want.memory / 2**20:.0f} MiB")
    return " and ".join(parts) or "room"


def _no_host_why(want: Want, targets: list[Host]) -> str:
    if not targets:
        return "no host of the app's owner is online (and not about to expire)"
    failed = [str(c) for c in want.constraints if not any(c.holds(h.labels, h.name, h.id) for h in targets)]
    if failed:
        return f"no online host satisfies {', '.join(failed)}"
    return "no online host satisfies all of " + ", ".join(str(c) for c in want.constraints)

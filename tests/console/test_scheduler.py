"""The scheduler's decisions on hand-made pools: placement, spreading, constraints, capacity, expiring and
lost hosts, hosts that come back, scaling down, apps that are gone, replicas moving off a capsule."""

from __future__ import annotations

from dao.console.apps.compose import Constraint
from dao.console.scheduler.place import Host, Pending, Remove, Replica, Start, Want, decide

GiB = 2**30
NOW = 10_000.0


def host(i: str, **kw) -> Host:  # type: ignore[no-untyped-def]
    return Host(i, name=f"host-{i}", **{"cpus": 2.0, "mem_total": 4 * GiB, "mem_used": 1 * GiB, **kw})


def web(replicas: int = 3, **kw) -> Want:  # type: ignore[no-untyped-def]
    return Want("shop", "web", replicas, "v1", **kw)


def test_replicas_spread_over_hosts_and_the_same_input_gives_the_same_answer() -> None:
    hosts = [host("a"), host("b"), host("c", mem_used=3 * GiB)]
    first = decide([web(4)], [], hosts, NOW)
    assert decide([web(4)], [], hosts, NOW) == first
    # the fewest of this service first, then the most free memory, then the ID
    assert [(s.index, s.host) for s in first.start] == [(0, "a"), (1, "b"), (2, "c"), (3, "a")]
    assert not first.remove and not first.pending


def test_running_replicas_stay_and_only_the_missing_are_placed() -> None:
    hosts = [host("a"), host("b")]
    running = [Replica("c0", "a", "shop", "web", 0, "v1"), Replica("c1", "b", "shop", "web", 1, "v1")]
    decision = decide([web(3)], running, hosts, NOW)
    assert [(s.index, s.host) for s in decision.start] == [(2, "a")]
    assert not decision.remove


def test_constraints_and_a_reason_when_nothing_fits() -> None:
    hosts = [host("a", labels={"region": "us"}), host("b", labels={"region": "eu"})]
    eu = web(2, constraints=(Constraint("labels.region", True, "eu"),))
    assert {s.host for s in decide([eu], [], hosts, NOW).start} == {"b"}
    mars = web(1, constraints=(Constraint("labels.region", True, "mars"),))
    decision = decide([mars], [], hosts, NOW)
    assert decision.start == [] and decision.pending == [
        Pending("shop", "web", 0, "no online host satisfies node.labels.region == mars")
    ]
    big = web(1, memory=8 * GiB)
    assert decide([big], [], hosts, NOW).pending[0].why == "no host has 8192 MiB free"


def test_capacity_is_counted_as_replicas_are_placed() -> None:
    hosts = [host("a", mem_used=3 * GiB), host("b", mem_used=3 * GiB)]  # 1 GiB free each
    decision = decide([web(3, memory=GiB // 2)], [], hosts, NOW)
    assert [s.host for s in decision.start] == ["a", "b", "a"]  # half a GiB each: a is full after two
    decision = decide([web(5, memory=GiB // 2)], [], hosts, NOW)
    assert len(decision.start) == 4 and [p.index for p in decision.pending] == [4]


def test_offline_hosts_and_hosts_about_to_expire_are_no_targets() -> None:
    hosts = [
        host("gone", online=False, offline_since=NOW - 5),
        host("capsule", expires_at=NOW + 300),
        host("ok"),
    ]
    assert {s.host for s in decide([web(3)], [], hosts, NOW, expiry_lead=600).start} == {"ok"}
    assert {s.host for s in decide([web(3)], [], hosts, NOW, expiry_lead=60).start} == {"ok", "capsule"}


def test_a_host_away_past_the_grace_loses_its_replicas_and_gets_them_removed_when_back() -> None:
    running = [Replica("c0", "a", "shop", "web", 0, "v1", created=1), Replica("c1", "b", "shop", "web", 1, "v1")]
    within = [host("a", online=False, offline_since=NOW - 30), host("b")]
    assert decide([web(2)], running, within, NOW, host_grace=60).start == []  # it may come back: wait
    past = [host("a", online=False, offline_since=NOW - 90), host("b")]
    decision = decide([web(2)], running, past, NOW, host_grace=60)
    assert decision.start == [Start("shop", "web", 0, "b", "v1")] and decision.remove == []
    # placed again as c2 on b; then a comes back with its old c0: the old copy goes, the new one stays
    back = [*running, Replica("c2", "b", "shop", "web", 0, "v1", created=2)]
    decision = decide([web(2)], back, [host("a"), host("b")], NOW)
    assert decision.start == [] and decision.remove == [Remove("c0", "a", "a second copy of one replica", drain=True)]


def test_scaled_down_and_deleted_apps_are_removed() -> None:
    running = [
        Replica("c0", "a", "shop", "web", 0, "v1"),
        Replica("c1", "a", "shop", "web", 1, "v1"),
        Replica("old", "a", "blog", "web", 0, "v1"),
    ]
    decision = decide([web(1)], running, [host("a")], NOW)
    assert sorted(r.container for r in decision.remove) == ["c1", "old"] and decision.start == []


def test_a_thousand_hosts_and_five_thousand_replicas() -> None:
    """Not a timed assertion (bench/scheduler.py times it): every replica is placed and none doubly."""
    hosts = [host(f"h{i:04d}", labels={"region": "eu" if i % 2 else "us"}) for i in range(1000)]
    wants = [
        Want(f"app{i}", "svc", 5, "v1", constraints=(Constraint("labels.region", True, "eu"),) if i % 3 == 0 else ())
        for i in range(1000)
    ]
    decision = decide(wants, [], hosts, NOW)
    assert len(decision.start) == 5000 and not decision.pending
    assert len({(s.app, s.index) for s in decision.start}) == 5000
    per_service = {}
    for s in decision.start:
        per_service.setdefault(s.app, set()).add(s.host)
    assert all(len(on) == 5 for on in per_service.values())  # five replicas on five hosts


def test_a_new_spec_rolls_out_one_replica_at_a_time_make_before_break() -> None:
    hosts = [host("a"), host("b")]
    v2 = Want("shop", "web", 2, "v2")
    old = [Replica("o0", "a", "shop", "web", 0, "v1", created=1), Replica("o1", "b", "shop", "web", 1, "v1", created=1)]
    first = decide([v2], old, hosts, NOW)
    assert [(s.index, s.spec) for s in first.start] == [(0, "v2")] and first.remove == []  # one, beside the old
    starting = [*old, Replica("n0", first.start[0].host, "shop", "web", 0, "v2", created=2, ready=False)]
    waiting = decide([v2], starting, hosts, NOW)
    assert waiting.start == [] and waiting.remove == []  # not ready: the old one keeps serving, the next waits
    ready = [*old, Replica("n0", first.start[0].host, "shop", "web", 0, "v2", created=2)]
    next_step = decide([v2], ready, hosts, NOW)
    assert next_step.remove == [Remove("o0", "a", "replaced by its new spec, now ready", drain=True)]
    assert [(s.index, s.spec) for s in next_step.start] == [(1, "v2")]
    failing = [*old, Replica("n0", "a", "shop", "web", 0, "v2", created=2, running=False, ready=False)]
    held = decide([v2], failing, hosts, NOW)
    assert held.remove == [] and held.start == []  # a failed update stops there and keeps the old replicas


def test_replicas_move_off_a_host_about_to_expire_make_before_break() -> None:
    hosts = [host("capsule", expires_at=NOW + 300), host("b")]
    on_capsule = [Replica("c0", "capsule", "shop", "web", 0, "v1", created=1)]
    first = decide([web(1)], on_capsule, hosts, NOW, expiry_lead=600)
    assert first.start == [Start("shop", "web", 0, "b", "v1")] and first.remove == []  # the old one serves on
    starting = [*on_capsule, Replica("n0", "b", "shop", "web", 0, "v1", created=2, ready=False)]
    waiting = decide([web(1)], starting, hosts, NOW, expiry_lead=600)
    assert waiting.start == [] and waiting.remove == []
    ready = [*on_capsule, Replica("n0", "b", "shop", "web", 0, "v1", created=2)]
    done = decide([web(1)], ready, hosts, NOW, expiry_lead=600)
    assert done.start == [] and done.remove == [Remove("c0", "capsule", "moved off a host about to expire", True)]
    # the copy on the lasting host is the one kept even when the capsule's is newer
    newer = [Replica("c0", "capsule", "shop", "web", 0, "v1", created=3), Replica("n0", "b", "shop", "web", 0, "v1")]
    assert [r.container for r in decide([web(1)], newer, hosts, NOW, expiry_lead=600).remove] == ["c0"]
    # before the lead mark nothing moves
    assert decide([web(1)], on_capsule, hosts, NOW, expiry_lead=60) == decide(
        [web(1)], on_capsule, hosts, NOW, expiry_lead=60
    )
    assert decide([web(1)], on_capsule, hosts, NOW, expiry_lead=60).start == []


def test_a_stateful_replica_moves_with_its_volumes_and_nowhere_to_go_is_pending() -> None:
    hosts = [host("capsule", expires_at=NOW + 300), host("b")]
    db = Want("shop", "db", 1, "v1", stateful=True)
    old = Replica("d0", "capsule", "shop", "db", 0, "v1", created=1)
    [start] = decide([db], [old], hosts, NOW, expiry_lead=600).start
    assert start == Start("shop", "db", 0, "b", "v1", move_from=old)
    # under way: the old one stopped, the new one made and not yet started: no second move, nothing removed
    moving = [Replica("d0", "capsule", "shop", "db", 0, "v1", running=False, ready=False),
              Replica("n0", "b", "shop", "db", 0, "v1", created=2, running=False, ready=False)]  # fmt: skip
    assert decide([db], moving, hosts, NOW, expiry_lead=600).start == []
    moved = [moving[0], Replica("n0", "b", "shop", "db", 0, "v1", created=2)]
    assert decide([db], moved, hosts, NOW, expiry_lead=600).remove == [
        Remove("d0", "capsule", "moved off a host about to expire", False)
    ]
    alone = decide([db], [old], hosts[:1], NOW, expiry_lead=600)
    assert alone.start == [] and alone.pending == [
        Pending("shop", "db", 0, "no host of the app's owner is online (and not about to expire)", moving=True)
    ]

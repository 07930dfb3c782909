"""Users, monthly usage and quotas: the meter in process with a clock we move, then real clients pulling
through their own host names, a quota refusal, a quota raise, and counts surviving a clean stop."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from dao.mirror.accounts import Accounts
from dao.mirror.app import wire
from dao.mirror.errors import MirrorError
from dao.mirror.usage import Meter
from dao.units import parse_size
from tests.conftest import World
from tests.mirror.test_faults import DOCKER_ACCEPT
from tests.services.mirror import DAO, Mirror, skopeo_copy
from tests.services.postgres import Postgres

DOMAIN = "mirror.test"


@pytest.fixture(scope="module")
def postgres(isolated: None) -> Iterator[Postgres]:
    server = Postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/dao.db"
    server: Postgres = request.getfixturevalue("postgres")
    return server.create_database(f"dao_{tmp_path.name[-20:].replace('-', '_').lower()}")


async def test_meter_counts_by_month_and_enforces_quota(database: str) -> None:
    accounts = Accounts(database)
    alice = accounts.add_user("Alice", user_id="alice", quota_bytes=1000)
    assert alice.address is not None and alice.token is not None
    assert len(alice.address) == 24 and alice.address.isalnum()  # 120 random bits, one DNS label
    now = [time.mktime((2026, 11, 30, 23, 59, 0, 0, 0, 0)) - time.timezone]  # 2026-11-30 23:59 UTC
    meter = Meter(accounts, domain=DOMAIN, anonymous=False, clock=lambda: now[0])
    await meter.refresh()
    assert meter.identify(f"{alice.address}.{DOMAIN}:5000", None) == "alice"
    assert meter.identify(f"{alice.address.upper()}.{DOMAIN}", None) == "alice"  # host names have no case
    assert meter.identify("x", f"Bearer {alice.token}") == "alice"
    basic = base64.b64encode(f"alice:{alice.token}".encode()).decode()
    assert meter.identify("x", f"Basic {basic}") == "alice"
    assert meter.name_of("alice") == "Alice"
    # the public ID is no identity (it was the address, and --no-anonymous was bypassed with a Host header)
    bypass = [(f"alice.{DOMAIN}", None), ("x", "Basic " + base64.b64encode(b"alice:alice").decode())]
    for host, auth in [("x", None), (f"bob.{DOMAIN}", None), ("x", "Bearer nope"), ("x", "Basic !!!"), *bypass]:
        with pytest.raises(MirrorError) as info:
            meter.identify(host, auth)
        wired = wire(info.value)  # what the client gets
        assert wired.status == 401 and "Basic" in wired.headers["WWW-Authenticate"]

    meter.record("alice", sent=600, blob=True, hit=True)
    meter.check("alice")  # 600 < 1000
    meter.record("alice", sent=500, pull=True)
    with pytest.raises(MirrorError) as info:
        meter.check("alice")
    assert wire(info.value).status == 429
    assert info.value.message == (
        "monthly quota of 1000 B for alice is used up: 1.07 KiB served in 2026-11; it resets at 2026-12-01T00:00:00Z"
    )
    await meter.refresh()  # written, and read back: still over
    with pytest.raises(MirrorError):
        meter.check("alice")

    now[0] += 120  # 2026-12-01 00:01 UTC: a new month, a new allowance
    meter.check("alice")
    meter.record("alice", sent=10, blob=True)
    await meter.flush()
    rows = {(u, m): (x.bytes_served, x.blobs_served, x.pulls, x.hit_bytes) for u, m, x in accounts.usage()}
    assert rows == {("alice", "2026-11"): (1100, 1, 1, 600), ("alice", "2026-12"): (10, 1, 0, 0)}  # history kept

    accounts.set_quota("alice", 0)  # no limit, seen at the next refresh
    await meter.refresh()
    meter.record("alice", sent=10**9)
    meter.check("alice")


class SharedCounters:
    """What Redis keeps for a cluster's meters (:meth:`dao.mirror.cluster.Cluster.add_usage`), in memory;
    ``up = False`` is Redis down."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}
        self.up = True

    async def add_usage(self, month: str, deltas: dict[str, int]) -> dict[str, int] | None:
        if not self.up:
            return None
        row = self.counts.setdefault(month, {})
        for user, n in deltas.items():
            row[user] = row.get(user, 0) + n
        return dict(row)


async def test_meters_of_a_cluster_see_each_others_bytes_at_each_sync_and_never_count_them_twice(
    tmp_path: Path,
) -> None:
    accounts = Accounts(f"sqlite:///{tmp_path}/dao.db")
    accounts.add_user("Erin", user_id="erin", quota_bytes=250)
    shared = SharedCounters()
    a, b = Meter(accounts, live=shared), Meter(accounts, live=shared)
    month = time.strftime("%Y-%m", time.gmtime())
    await a.refresh()
    await b.refresh()
    a.record("erin", sent=100, blob=True)
    assert b.used("erin", month) == 0  # not synced yet
    await a.sync()
    await b.sync()
    assert a.used("erin", month) == b.used("erin", month) == 100
    b.record("erin", sent=100)
    await b.sync()
    await a.sync()
    assert a.used("erin", month) == b.used("erin", month) == 200
    a.record("erin", sent=60)
    await a.flush()  # A's 160 in SQL now; B has not read SQL since, and sees them all the same
    await a.sync()
    await b.sync()
    assert b.used("erin", month) == 260
    with pytest.raises(MirrorError):
        b.check("erin")  # 260 >= 250, whichever node is asked
    await b.refresh()  # B's 100 written; SQL and the shared totals agree
    await a.refresh()
    assert a.used("erin", month) == b.used("erin", month) == 260 == shared.counts[month]["erin"]
    shared.up = False  # Redis down: each node counts alone, nothing lost
    a.record("erin", sent=5)
    await a.sync()
    assert a.used("erin", month) == 265 and b.used("erin", month) == 260
    await a.flush()
    shared.up = True
    await a.sync()
    await b.sync()
    assert shared.counts[month]["erin"] == 265  # added once it answered again
    assert b.used("erin", month) == 265
    shared.counts.clear()  # Redis lost its data: SQL's totals still hold
    await b.refresh()
    await b.sync()
    assert b.used("erin", month) == 265
    rows = {(u, m): x.bytes_served for u, m, x in accounts.usage()}
    assert rows == {("erin", month): 265}


def test_sizes() -> None:
    assert parse_size("50GiB") == 50 * 1024**3
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("0") == 0
    for bad in ("", "GiB", "5 XB", "-1", "iB5"):
        with pytest.raises(ValueError):
            parse_size(bad)


def dao(*args: str) -> str:
    return subprocess.run([DAO, "mirror", *args], check=True, capture_output=True, text=True, timeout=60).stdout


async def test_users_pull_through_their_own_host_names(
    world: World, tmp_path: Path, named_hosts: Callable[..., None]
) -> None:
    data = tmp_path / "mirror" / "data"
    alice = json.loads(dao("users", "add", "Alice", "--id", "alice", "--data-dir", str(data), "--json"))
    bob = json.loads(dao("users", "add", "Bob B.", "--id", "bob", "--quota", "1GB", "--data-dir", str(data), "--json"))
    a_host, b_host = f"{alice['address_label']}.{DOMAIN}", f"{bob['address_label']}.{DOMAIN}"
    named_hosts(a_host, b_host)
    mirror = Mirror(
        tmp_path / "mirror",
        world.upstream.url,
        args=("--mirror-domain", DOMAIN, "--usage-flush", "0.3", "--no-anonymous"),
    )
    image = world.image("dao-test/schema2:v1")
    try:
        done = skopeo_copy(f"{a_host}:{mirror.port}", "dao-test/schema2:v1", tmp_path / "alice")
        assert done.returncode == 0, done.stderr
        done = skopeo_copy(f"{b_host}:{mirror.port}", "dao-test/schema2:v1", tmp_path / "bob")
        assert done.returncode == 0, done.stderr
        dao("users", "quota", "bob", "1MB", "--data-dir", str(data))  # less than bob has pulled this month
        await asyncio.sleep(0.8)  # two flush intervals: counts written, quotas re-read
        rows = {r["user"]: r for r in json.loads(dao("usage", "--json", "--data-dir", str(data)))}
        assert set(rows) == {"alice", "bob"}  # one row each; nobody anonymous
        blobs_size = sum(p.stat().st_size for p in image.blobs.values())
        for user in ("alice", "bob"):
            assert rows[user]["blobs_served"] == len(image.blobs)
            assert rows[user]["bytes_served"] >= blobs_size
            assert rows[user]["pulls"] >= 1
        assert rows["alice"]["hit_bytes"] == 0 and rows["bob"]["hit_bytes"] >= blobs_size  # bob got alice's cache
        assert rows["alice"]["month"] == time.strftime("%Y-%m", time.gmtime())

        url = f"{mirror.url}/v2/dao-test/schema2/manifests/v1"
        async with aiohttp.ClientSession() as s:
            async with s.get(url, headers={"Host": b_host, "Accept": DOCKER_ACCEPT}) as r:
                body = await r.json()
                assert r.status == 429
                message = body["errors"][0]["message"]
                assert body["errors"][0]["code"] == "TOOMANYREQUESTS"
                assert message.startswith("monthly quota of 976.56 KiB for bob is used up: ")
                assert "resets at" in message
            for guess in ("unknown.example", f"alice.{DOMAIN}", f"bob.{DOMAIN}"):  # the public ID is no identity
                async with s.get(url, headers={"Host": guess, "Accept": DOCKER_ACCEPT}) as r:
                    assert r.status == 401 and "Basic" in r.headers["WWW-Authenticate"]
            dao("users", "quota", "bob", "10GiB", "--data-dir", str(data))
            await asyncio.sleep(0.8)
            async with s.get(url, headers={"Host": b_host, "Accept": DOCKER_ACCEPT}) as r:
                assert r.status == 200  # raised, and seen within a flush interval
            dao("users", "reissue", "bob", "--address", "--data-dir", str(data))
            await asyncio.sleep(0.8)
            async with s.get(url, headers={"Host": b_host, "Accept": DOCKER_ACCEPT}) as r:
                assert r.status == 401  # the old address stopped working
        log = mirror.output()
        assert 'user="Alice"' in log and 'user="Bob B."' in log  # users are logged by name...
        assert 'registry=docker.io ua="skopeo/' in log  # ...with the registry and the client program
        for secret in (alice["address_label"], bob["address_label"], alice["token"], bob["token"]):
            assert secret not in log  # ...never by a secret
            assert secret.encode() not in (data / "dao.db").read_bytes()  # and only hashes are stored
        assert (data / "dao.db").stat().st_mode & 0o777 == 0o600
    finally:
        mirror.stop()


async def test_counts_survive_a_clean_stop(world: World, tmp_path: Path) -> None:
    mirror = Mirror(tmp_path / "mirror", world.upstream.url, args=("--usage-flush", "3600"))
    image = world.image("dao-test/schema2:v1")
    digest = image.layer_digests()[1]
    async with aiohttp.ClientSession() as s, s.get(f"{mirror.url}/v2/dao-test/schema2/blobs/{digest}") as r:
        assert r.status == 200
        await r.read()
    mirror.stop()  # SIGTERM: the meter's last act is a flush
    rows = json.loads(dao("usage", "--json", "--data-dir", str(mirror.data_dir)))
    assert [(r["user"], r["bytes_served"], r["blobs_served"]) for r in rows] == [
        ("anonymous", image.blobs[digest].stat().st_size, 1)
    ]


def test_a_database_from_before_hashing_is_migrated(tmp_path: Path) -> None:
    """Rows written with plaintext tokens and no address column: hashed in place, the tokens still work."""
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE dao_users (id VARCHAR(63) PRIMARY KEY, name VARCHAR(200) NOT NULL, "
            "token VARCHAR(100) NOT NULL UNIQUE, quota_bytes BIGINT, created_at FLOAT NOT NULL)"
        )
        db.execute("INSERT INTO dao_users VALUES ('c0ffee01', 'Carol', 'dao_plaintext-token', NULL, 0)")
    accounts = Accounts(f"sqlite:///{path}")
    assert b"dao_plaintext-token" not in path.read_bytes()
    carol = accounts.user("c0ffee01")
    assert carol.token.startswith("sha256:") and carol.address is None
    meter = Meter(accounts, domain=DOMAIN, anonymous=False)
    asyncio.run(meter.refresh())
    assert meter.identify("x", "Bearer dao_plaintext-token") == "c0ffee01"
    with pytest.raises(MirrorError):
        meter.identify(f"c0ffee01.{DOMAIN}", None)  # the old, guessable address is gone
    issued = accounts.reissue("c0ffee01", address=True)
    asyncio.run(meter.refresh())
    assert issued.address is not None and meter.identify(f"{issued.address}.{DOMAIN}", None) == "c0ffee01"
    Accounts(f"sqlite:///{path}")  # opening again changes nothing
    assert accounts.user("c0ffee01") == dataclasses.replace(carol, address=accounts.user("c0ffee01").address)


async def test_parallel_requests_cannot_overrun_a_quota_and_hangups_are_charged(world: World, tmp_path: Path) -> None:
    """Each blob response holds its bytes against the quota while it is sent, so four parallel requests for
    a 100 MiB blob under a 150 MiB quota get two answers and two 429s (each passed the check on its own);
    clients that hang up early are charged for what went out, not for nothing."""
    image = world.image("dao-test/big:v1")
    digest = max(image.layer_digests(), key=lambda d: image.blobs[d].stat().st_size)
    size = image.blobs[digest].stat().st_size
    data = tmp_path / "mirror" / "data"
    data.mkdir(parents=True)
    carol = Accounts(f"sqlite:///{data}/dao.db").add_user("Carol", user_id="carol", quota_bytes=size * 3 // 2)
    mirror = Mirror(tmp_path / "mirror", world.upstream.url, args=("--usage-flush", "0.3"))
    try:
        async with aiohttp.ClientSession() as s, s.get(f"{mirror.url}/v2/dao-test/big/blobs/{digest}") as r:
            assert r.status == 200 and len(await r.read()) == size  # cached now (anonymous)
        request = (
            f"GET /v2/dao-test/big/blobs/{digest} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {carol.token}\r\nConnection: close\r\n\r\n"
        ).encode()
        socks = []
        for _ in range(4):  # slow readers: each response stays in flight
            sock = socket.create_connection(("127.0.0.1", mirror.port), timeout=10)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.sendall(request)
            socks.append(sock)
        statuses = []
        for sock in socks:
            head = sock.recv(65536)
            statuses.append(int(head.split(b" ", 2)[1]))
        assert sorted(statuses) == [200, 200, 429, 429]
        for sock in socks:
            sock.close()  # hang up early
        await asyncio.sleep(1.0)
        rows = [r for r in json.loads(dao("usage", "--json", "--data-dir", str(data))) if r["user"] == "carol"]
        assert len(rows) == 1
        assert 0 < rows[0]["bytes_served"] < size  # what went out before the hang-ups: neither nothing nor all
        assert rows[0]["blobs_served"] == 0
    finally:
        mirror.stop()

"""Hosts as they are in the wild: each in a network namespace of its own whose only route is to the console
and into which no connection can be opened (so the agent works outbound only), each with its own dockerd.
One is set up by the real ``install.sh``. Then the faults: a link cut while a command is in flight (it runs
once, and its result still arrives), a link cut for 30 s (no gap in the charts), and the console killed and
restarted (every host back on its own)."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.console.test_install import wheels  # noqa: F401  (the fixture)
from tests.console.test_operations import TICKER
from tests.services import images
from tests.services.console import Client, Console
from tests.services.dockerd import Dockerd
from tests.services.mirror import DAO
from tests.services.netns import NetHost
from tests.services.procs import Process, wait_until

INTERVAL = 0.5  # seconds between the agents' samples


@pytest.fixture
def pool(tmp_path: Path, isolated: None) -> Iterator[tuple[Console, list[NetHost], list[Dockerd]]]:
    console = Console(tmp_path, users=("alice",), listen="0.0.0.0")
    hosts: list[NetHost] = []
    engines: list[Dockerd] = []
    try:
        for i in (1, 2):
            hosts.append(NetHost(i))
            (tmp_path / f"engine{i}").mkdir()
            engines.append(Dockerd(tmp_path / f"engine{i}", [], prefix=hosts[-1].run()))
        yield console, hosts, engines
    finally:
        for engine in engines:
            engine.stop()
        for host in hosts:
            host.close()
        console.stop()


def samples(console: Console, host: str) -> list[dict]:
    import sqlite3

    with sqlite3.connect(console.data / "dao.db") as db:
        rows = db.execute("SELECT seq, data FROM console_samples WHERE host_id = ? ORDER BY seq", (host,))
        return [{"seq": seq, **json.loads(data)} for seq, data in rows]


def online(console: Console, name: str) -> bool:
    return any(h["name"] == name and h["online"] for h in console.hosts())


def test_hosts_behind_their_own_walls(pool, tmp_path: Path, wheels: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    console, (h1, h2), (e1, e2) = pool
    layer = images.busybox_layer(tmp_path)
    for engine in (e1, e2):
        engine.docker("import", "--change", 'CMD ["/bin/sh"]', str(layer.path), "base:1")
        engine.docker("run", "-d", "--name", "web", "--network", "none", "base:1", "sh", "-c", TICKER)

    # h1: the one-line install, inside the host, from the console's address as that host sees it
    prefix = tmp_path / "h1"
    url = f"http://{h1.outside}:{console.port}"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "DAO_PREFIX": str(prefix),
           "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}  # fmt: skip
    line = f"curl -fsSL {url}/install.sh | sh -s -- {console.token('alice')}"
    done = subprocess.run(h1.run("sh", "-c", line), capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    installed = prefix / "usr/local/bin/dao"
    # h2: enrolled by hand, with the dao of this checkout
    config2 = tmp_path / "h2.toml"
    token = console.token("alice")
    enrolled = subprocess.run(
        h2.run(DAO, "agent", "enroll", "--console", f"http://{h2.outside}:{console.port}", "--token", token,
               "--config", str(config2), "--name", "h2"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert enrolled.returncode == 0, enrolled.stderr
    run = ["agent", "run", "--interval", str(INTERVAL)]
    agents = [
        Process(h1.run(str(installed), *run, "--config", str(prefix / "etc/dao/agent.toml")), tmp_path / "a1.log",
                {"DOCKER_HOST": f"unix://{e1.sock}"}),
        Process(h2.run(DAO, *run, "--config", str(config2)), tmp_path / "a2.log", {"DOCKER_HOST": f"unix://{e2.sock}"}),
    ]  # fmt: skip
    listener = Process(
        h2.run("python3", "-m", "http.server", "--bind", h2.inside, "8000"), tmp_path / "listener.log"
    )  # a service on the host, to show that nothing reaches in
    try:
        wait_until(lambda: len(console.hosts()) == 2 and all(h["online"] for h in console.hosts()), 60, "both online")
        by_name = {h["name"]: h for h in console.hosts()}
        host1 = next(h for n, h in by_name.items() if n != "h2")
        host2 = by_name["h2"]
        assert host1["facts"]["docker"] and host2["facts"]["docker"]  # each reports its own engine
        with pytest.raises(OSError):  # the SYN is dropped: from the console's side the host cannot be reached
            socket.create_connection((h2.inside, 8000), timeout=2).close()
        assert (
            subprocess.run(
                h2.run("python3", "-c", f"import socket; socket.create_connection(('{h2.inside}', 8000))"), timeout=30
            ).returncode
            == 0
        )  # fmt: skip  (it does listen)

        asyncio.run(_commands_across_a_cut(console, host1["id"], host2["id"], h2, e1, e2))
        _thirty_seconds_cut(console, host2["id"], h2)

        console.proc.kill()  # type: ignore[union-attr]  # no close frames: the agents find out by themselves
        time.sleep(2)
        console.start()
        started = time.monotonic()
        wait_until(lambda: len(console.hosts()) == 2 and all(h["online"] for h in console.hosts()), 75, "back online")
        print(f"both hosts back {time.monotonic() - started:.1f} s after the console restarted")
    finally:
        listener.stop()
        for agent in agents:
            agent.stop()
            assert "Traceback" not in agent.output()
    assert "Traceback" not in console.log.read_text()


async def _commands_across_a_cut(console: Console, id1: str, id2: str, h2: NetHost, e1: Dockerd, e2: Dockerd) -> None:
    async with Client(console.url) as alice:
        await alice.login("alice")
        await alice.json("POST", f"/api/hosts/{id1}/containers/web/stop")  # each command on its own host only
        assert _state(e1) == "exited" and _state(e2) == "running"
        # A stop that takes the agent 3 s (the shell ignores SIGTERM): the link goes while it runs, the
        # result is lost on the way, and comes when the host is back, from the agent's ledger: run once.
        since = time.time()
        stop = asyncio.ensure_future(alice.call("POST", f"/api/hosts/{id2}/containers/web/stop?grace=3"))
        await asyncio.sleep(1)
        h2.cut()
        await asyncio.sleep(4)
        h2.mend()
        status, doc = await asyncio.wait_for(stop, 60)
        assert status == 200 and doc == {"id": "web", "done": "stop"}, (status, doc)
        assert _state(e2) == "exited"
        events = e2.docker("events", "--since", f"{since:.3f}", "--until", f"{time.time():.3f}", "--filter",
                           "event=stop", "--format", "{{.Action}}").stdout.split()  # fmt: skip
        assert events == ["stop"], events  # once


def _thirty_seconds_cut(console: Console, host: str, h2: NetHost) -> None:
    before = samples(console, host)[-1]["seq"]
    h2.cut()
    wait_until(lambda: not online(console, "h2"), 15, "h2 offline")
    time.sleep(30)
    h2.mend()
    wait_until(lambda: online(console, "h2"), 60, "h2 back online")
    wait_until(lambda: samples(console, host)[-1]["seq"] > before + 30 / INTERVAL, 30, "the buffered samples")
    got = samples(console, host)
    assert [s["seq"] for s in got] == list(range(got[0]["seq"], got[-1]["seq"] + 1))  # none lost, none twice
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(got)]
    assert max(gaps) < 4 * INTERVAL, f"a gap of {max(gaps):.1f} s in the chart"  # the cut lasted 30 s


def _state(engine: Dockerd) -> str:
    return engine.docker("inspect", "--format", "{{.State.Status}}", "web").stdout.strip()

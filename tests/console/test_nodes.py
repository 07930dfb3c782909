"""Two console nodes behind a TCP balancer, on one PostgreSQL and one Redis (``dao console serve --redis``):
agents spread over both; a command and a log stream asked of the node that does not hold the host's
channel; one node killed: its agents come back on the other, which then runs the scheduler."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services.console import Client, Console, agent
from tests.services.dockerd import Dockerd
from tests.services.postgres import Postgres
from tests.services.procs import Process, free_port, until, until_async, wait_until
from tests.services.redis import Redis

WEB = """services:
  web:
    image: base:1
    command: sh -c 'busybox sleep 3600'
    pull_policy: never
"""


class Balancer:
    def __init__(self, workdir: Path, ports: list[int]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        script = Path(__file__).parents[1] / "services" / "balancer.py"
        argv = [sys.executable, str(script), "--port", str(self.port), *(f"127.0.0.1:{p}" for p in ports)]
        self.proc = Process(argv, workdir / "balancer.log")
        wait_until(lambda: _connects(self.port), 10, "balancer", self.proc.proc)

    def stop(self) -> None:
        self.proc.kill()


def _connects(port: int) -> bool:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[tuple[str, Redis]]:
    pg = Postgres()
    try:
        redis = Redis(tmp_path / "redis")
        try:
            yield pg.create_database("dao_nodes"), redis
        finally:
            redis.stop()
    finally:
        pg.stop()


def channels(redis: Redis) -> dict[str, str]:
    """host ID -> the node its channel is on, as Redis says."""
    out = subprocess.run(
        ["redis-cli", "-p", str(redis.port), "--json", "hgetall", "dao:console:channels"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return {host: json.loads(doc)["node"] for host, doc in json.loads(out or "{}").items()}


def leader(redis: Redis) -> str:
    out = subprocess.run(
        ["redis-cli", "-p", str(redis.port), "get", "dao:console:leader"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return out.partition(" ")[2]


def node_name(console: Console) -> str:
    assert console.proc is not None
    found = [line for line in console.log.read_text().splitlines() if "console node " in line]
    return found[0].split("console node ")[1].split()[0]


async def test_two_console_nodes_route_commands_and_take_over_each_others_agents(
    tmp_path: Path, dockerd: Dockerd, shared: tuple[str, Redis]
) -> None:
    database, redis = shared
    secret = tmp_path / "secret"
    secret.write_text("ab" * 32 + "\n")
    args = ("--redis", redis.url, "--secret-file", str(secret))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Console(tmp_path / "a", users=("alice",), args=args, database=database)
    b: Console | None = None
    other: Dockerd | None = None
    balancer: Balancer | None = None
    agents: list[Process] = []
    try:
        await until(lambda: leader(redis) == node_name(a), 15, "node A to take the scheduler")
        b_port = free_port()
        balancer = Balancer(tmp_path, [a.port, b_port])
        (tmp_path / "engine2").mkdir()
        other = Dockerd(tmp_path / "engine2", [])
        engines = [dockerd, other]
        for engine in engines:
            engine.docker("import", "--change", 'CMD ["/bin/sh"]', str(_busybox(tmp_path)), "base:1")
        hosts = []
        for i, engine in enumerate(engines):
            config = tmp_path / f"agent{i}" / "agent.toml"
            config.parent.mkdir()
            enrolled = a.enroll("alice", config, name=f"host{i}", via=balancer.url)  # (and they dial it too)
            assert enrolled.returncode == 0, enrolled.stderr
            hosts.append(enrolled.stdout.split("enrolled as host ")[1].split(";")[0])
            agents.append(agent(config, tmp_path / f"agent{i}.log", f"unix://{engine.sock}"))
            if i == 0:
                await until(lambda: hosts[0] in channels(redis), 20, "host0 on node A")
                b = Console(tmp_path / "b", users=(), args=args, database=database, port=b_port)
        assert b is not None
        await until(lambda: len(channels(redis)) == 2, 20, "both hosts online")
        where = channels(redis)
        assert where[hosts[0]] == node_name(a) and where[hosts[1]] == node_name(b)  # one on each node
        box = engines[0].docker("run", "-d", "base:1", "sh", "-c", "echo hello from host0; busybox sleep 300").stdout
        async with Client(b.url) as on_b, Client(a.url) as on_a:
            await on_b.login("alice")
            await on_a.login("alice")
            # host0's channel is on A: B routes the command there, and the log stream comes back the same way
            await until_async(lambda: _has_container(on_b, hosts[0], box.strip()), 20, "B to see host0's state")
            text = await _log_stream(on_b, hosts[0], box.strip()[:12], "hello from host0")
            assert "hello from host0" in text
            status, doc = await on_a.call("POST", f"/api/hosts/{hosts[0]}/containers/{box.strip()[:12]}/stop")
            assert status == 200, doc
            assert engines[0].docker("inspect", "-f", "{{.State.Running}}", box.strip()).stdout.strip() == "false"
            status, doc = await on_b.call("POST", f"/api/hosts/{hosts[0]}/containers/{box.strip()[:12]}/start")
            assert status == 200, doc  # (from the node without the channel)
            assert engines[0].docker("inspect", "-f", "{{.State.Running}}", box.strip()).stdout.strip() == "true"

        assert a.proc is not None
        a.proc.kill()  # node A dies: its channel, and the scheduler's lease with it
        await until(lambda: channels(redis).get(hosts[0]) == node_name(b), 30, "host0 back, on node B")
        await until(lambda: leader(redis) == node_name(b), 30, "node B to take the scheduler")
        async with Client(b.url) as on_b:
            await on_b.login("alice")
            text = await _log_stream(on_b, hosts[0], box.strip()[:12], "hello from host0")
            assert "hello from host0" in text
            await on_b.json("POST", "/api/apps", {"name": "web", "compose": WEB})

            def replicas() -> int:
                return sum(len(e.docker("ps", "-q", "--filter", "label=dao.app").stdout.split()) for e in engines)

            await until(lambda: replicas() == 1, 60, "the app's replica, placed by node B's scheduler")
        assert "this node runs the scheduler now" in b.log.read_text()
        for log in (a.log, b.log):
            assert "Traceback" not in log.read_text()
    finally:
        for running in agents:
            running.stop()
        for console in (a, b):
            if console is not None:
                console.stop()
        if balancer is not None:
            balancer.stop()
        if other is not None:
            for name in other.docker("ps", "-aq").stdout.split():
                other.docker("rm", "-f", name, check=False)
            other.stop()


def _busybox(tmp_path: Path) -> Path:
    from tests.services import images

    where = tmp_path / "layers"
    where.mkdir(exist_ok=True)
    return images.busybox_layer(where).path


async def _has_container(client: Client, host: str, container: str) -> bool:
    status, doc = await client.call("GET", f"/api/hosts/{host}")
    return status == 200 and any(c.get("id", "").startswith(container[:12]) for c in doc["containers"])


async def _log_stream(client: Client, host: str, container: str, wanted: str) -> str:
    """The container's log stream (server-sent events), read until ``wanted`` shows."""
    text = ""
    async with asyncio.timeout(20):
        async with client.session.get(f"{client.url}/api/hosts/{host}/containers/{container}/logs") as resp:
            assert resp.status == 200, await resp.text()
            async for line in resp.content:
                text += line.decode(errors="replace")
                if wanted in text:
                    return text
    return text

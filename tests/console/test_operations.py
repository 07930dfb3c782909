"""The console acting on a host through its agent, end to end: a real console, a real agent on a real
dockerd, and the JSON API a signed-in user (and the pages) call. What the engine really did is checked with
the docker CLI, never taken from the console's word."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import World
from tests.services import images
from tests.services.console import Client, Console, agent
from tests.services.dockerd import Dockerd
from tests.services.mirror import Mirror
from tests.services.procs import Process, wait_until
from tests.services.procs import until_async as until

TICKER = "i=0; while true; do echo tick $i; i=$((i+1)); busybox sleep 0.2; done"


@dataclass
class Host:
    console: Console
    engine: Dockerd
    agent: Process
    id: str
    config: Path


@pytest.fixture
def host(tmp_path: Path, dockerd: Dockerd) -> Iterator[Host]:
    """alice's host: the session's dockerd (with base:1 on it) and an agent for it, online at the console."""
    layer = images.busybox_layer(tmp_path)
    dockerd.docker("import", "--change", 'CMD ["/bin/sh"]', str(layer.path), "base:1")
    console = Console(tmp_path)
    config = tmp_path / "agent" / "agent.toml"
    try:
        done = console.enroll("alice", config)
        assert done.returncode == 0, done.stderr
        running = agent(config, tmp_path / "agent.log", f"unix://{dockerd.sock}", cache=tmp_path / "agent-cache")
        try:
            wait_until(lambda: console.hosts()[0]["online"], 30, "host online", running.proc)
            yield Host(console, dockerd, running, console.hosts()[0]["id"], config)
        finally:
            running.stop()
            assert "Traceback" not in running.output()
    finally:
        console.stop()
        assert "Traceback" not in console.log.read_text()


@pytest.fixture
async def alice(host: Host) -> AsyncIterator[Client]:
    async with Client(host.console.url) as client:
        yield await client.login("alice")


async def container(client: Client, host: Host, name: str) -> dict | None:
    found = await client.json("GET", f"/api/hosts/{host.id}")
    return next((c for c in found["containers"] if c["name"] == name), None)


def engine_state(host: Host, name: str) -> str:
    return host.engine.docker("inspect", "--format", "{{.State.Status}}", name).stdout.strip()


async def test_stop_start_restart_and_remove_a_container_from_the_console(host: Host, alice: Client) -> None:
    host.engine.docker("run", "-d", "--name", "ticker", "--network", "none", "base:1", "sh", "-c", TICKER)
    await until(lambda: _is(alice, host, "ticker", "running"), 10, "the new container in the console")

    stopped = await alice.json("POST", f"/api/hosts/{host.id}/containers/ticker/stop")
    assert stopped == {"id": "ticker", "done": "stop"}
    assert engine_state(host, "ticker") == "exited"  # the engine did it, not just the console's table
    await until(lambda: _is(alice, host, "ticker", "exited"), 10, "the console to show it stopped")

    await alice.json("POST", f"/api/hosts/{host.id}/containers/ticker/start")
    assert engine_state(host, "ticker") == "running"
    started_at = host.engine.docker("inspect", "--format", "{{.State.StartedAt}}", "ticker").stdout
    await alice.json("POST", f"/api/hosts/{host.id}/containers/ticker/restart")
    assert host.engine.docker("inspect", "--format", "{{.State.StartedAt}}", "ticker").stdout != started_at

    status, refused = await alice.call("POST", f"/api/hosts/{host.id}/containers/ticker/remove")
    assert status == 409 and "stop" in refused["error"].lower()  # the engine refuses a running one; so do we
    await alice.json("POST", f"/api/hosts/{host.id}/containers/ticker/stop")
    await alice.json("POST", f"/api/hosts/{host.id}/containers/ticker/remove")
    assert host.engine.docker("ps", "-aq", "--filter", "name=ticker").stdout.strip() == ""
    status, missing = await alice.call("POST", f"/api/hosts/{host.id}/containers/nosuch/start")
    assert status == 409 and "nosuch" in missing["error"]
    status, _ = await alice.call("POST", f"/api/hosts/{host.id}/containers/ticker/frobnicate")
    assert status == 404


async def _is(client: Client, host: Host, name: str, state: str) -> bool:
    found = await container(client, host, name)
    return found is not None and found["state"] == state


async def test_a_container_killed_outside_dao_shows_dead_within_two_seconds(host: Host, alice: Client) -> None:
    host.engine.docker("run", "-d", "--name", "victim", "--network", "none", "base:1", "sh", "-c", TICKER)
    await until(lambda: _is(alice, host, "victim", "running"), 10, "the container in the console")
    async with alice.session.get(f"{host.console.url}/api/live") as live:
        assert (await live.content.readline()).startswith(b": connected")
        killed = time.monotonic()
        host.engine.docker("kill", "victim")
        async with asyncio.timeout(10):
            while True:
                line = await live.content.readline()
                if not line.startswith(b"data: "):
                    continue
                message = json.loads(line[6:])
                event = message["data"] if message["kind"] == "event" else {}
                if event.get("name") == "victim" and event.get("action") == "die":
                    break
        seen = time.monotonic() - killed
    assert seen < 2.0, f"the death took {seen:.2f} s to reach the page"
    await until(lambda: _is(alice, host, "victim", "exited"), 2, "the state to follow the event")


async def test_logs_stream_live_and_stop_at_the_agent_when_the_page_goes(host: Host, alice: Client) -> None:
    host.engine.docker("run", "-d", "--name", "talker", "--network", "none", "base:1", "sh", "-c", TICKER)
    await until(lambda: _is(alice, host, "talker", "running"), 10, "the container in the console")
    text = ""
    async with alice.session.get(f"{host.console.url}/api/hosts/{host.id}/containers/talker/logs") as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        async with asyncio.timeout(20):
            while text.count("tick") < 12:  # 0.2 s apart: more than the tail, so some came while we listened
                line = await resp.content.readline()
                if line.startswith(b"data: "):
                    text += json.loads(line[6:])
    numbers = [int(w) for w in text.split() if w.isdigit()]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # in order, none lost, none twice
    ledger = host.config.parent / "commands.json"

    async def cancelled() -> bool:  # (async: a blocking wait would keep this loop from closing the stream)
        return any(r.get("data") == "cancelled" for r in json.loads(ledger.read_text()).values())

    await until(cancelled, 10, "the agent to end the log stream the page closed")


async def test_clean_applies_exactly_the_plan_that_was_shown(host: Host, alice: Client) -> None:
    host.engine.docker("run", "--name", "junk", "--network", "none", "base:1", "true")
    host.engine.docker("create", "--name", "junk2", "--network", "none", "base:1")
    made = await alice.json("POST", f"/api/hosts/{host.id}/clean/plan", {"grace": 0})
    planned = {item["name"] for item in made["plan"]["items"] if item["kind"] == "container"}
    assert {"junk", "junk2"} <= planned
    host.engine.docker("run", "--name", "after-the-plan", "--network", "none", "base:1", "true")

    result = await alice.json("POST", f"/api/hosts/{host.id}/clean/apply", {"plan_id": made["plan_id"]})
    removed = {o["name"] for o in result["removed"]}
    assert {"junk", "junk2"} <= removed and "after-the-plan" not in removed
    left = host.engine.docker("ps", "-a", "--format", "{{.Names}}").stdout.split()
    assert "after-the-plan" in left and "junk" not in left and "junk2" not in left
    status, again = await alice.call("POST", f"/api/hosts/{host.id}/clean/apply", {"plan_id": made["plan_id"]})
    assert status == 404 and "applied once" in again["error"]  # a plan is applied once


async def test_pull_runs_dao_pull_on_the_host_with_its_progress(
    host: Host, alice: Client, world: World, tmp_path: Path, docker_mirror_port: int
) -> None:
    mirror = Mirror(tmp_path / "mirror", world.upstream.url, port=docker_mirror_port)  # the engine's mirror
    try:
        async with alice.session.post(
            f"{host.console.url}/api/hosts/{host.id}/pull",
            json={"ref": "dao-test/schema2:v1"},
            headers={"X-CSRF-Token": alice.csrf},
        ) as resp:
            assert resp.status == 200
            lines = [json.loads(line) for line in (await resp.text()).splitlines() if line.strip()]
    finally:
        mirror.stop()
    output = "".join(line.get("output", "") for line in lines)
    assert lines[-1] == {"ok": True, "result": {"ref": "dao-test/schema2:v1", "status": 0}}, lines[-1]
    assert "Pulling from dao-test/schema2" in output and "Pull complete" in output
    pulled = host.engine.docker("image", "inspect", "--format", "{{.Id}}", "dao-test/schema2:v1").stdout.strip()
    assert pulled == json.loads(world.image("dao-test/schema2:v1").manifest)["config"]["digest"]


async def test_an_offline_host_is_refused_at_once(host: Host, alice: Client) -> None:
    host.agent.kill()
    await until(lambda: _offline(alice, host), 3 * host.console.ping + 10, "the host offline")
    started = time.monotonic()
    status, refused = await alice.call("POST", f"/api/hosts/{host.id}/containers/x/start")
    assert status == 409 and "offline" in refused["error"] and time.monotonic() - started < 5


async def _offline(client: Client, host: Host) -> bool:
    return not (await client.json("GET", f"/api/hosts/{host.id}"))["online"]


async def test_revoke_from_the_page_cuts_the_host_at_once(host: Host, alice: Client) -> None:
    started = time.monotonic()
    assert await alice.json("POST", f"/api/hosts/{host.id}/revoke") == {"revoked": host.id}
    host.agent.proc.wait(10)  # the channel closed now, not at the next ping; the next dial is refused
    assert host.agent.proc.returncode == 1 and time.monotonic() - started < 10
    assert "refuses this host's credential" in host.agent.output()
    found = await alice.json("GET", f"/api/hosts/{host.id}")
    assert found["revoked"] is True and found["online"] is False

"""The Engine API client against a real dockerd: the typed calls the agent will use first."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from dao.engine import Engine, EngineError
from dao.engine.wire import WireEngine, reachable
from tests.services import images
from tests.services.dockerd import Dockerd


async def test_events_name_what_happened_to_a_container(dockerd: Dockerd, tmp_path) -> None:
    image = dockerd.docker("import", str(images.busybox_layer(tmp_path).path), "events-test:1").stdout.strip()
    since = time.time() - 1  # the engine's clock and ours are one clock here; a second of slack for rounding
    cid = dockerd.docker("create", "--name", "events-test", image, "true").stdout.strip()
    dockerd.docker("rm", cid)
    async with Engine(f"unix://{dockerd.sock}") as engine:
        await engine.negotiate()
        seen = []
        async with asyncio.timeout(30):
            async for event in engine.events(since=since, until=time.time() + 1, filters={"container": [cid]}):
                seen.append((event.get("Type"), event.get("Action"), (event.get("Actor") or {}).get("ID")))
    assert ("container", "create", cid) in seen and ("container", "destroy", cid) in seen
    assert {kind for kind, _, _ in seen} == {"container"}  # the filter held
    assert [a for _, a, _ in seen].index("create") < [a for _, a, _ in seen].index("destroy")


async def test_events_of_a_live_stream_arrive_as_they_happen(dockerd: Dockerd, tmp_path) -> None:
    image = dockerd.docker("import", str(images.busybox_layer(tmp_path).path), "events-live:1").stdout.strip()
    async with Engine(f"unix://{dockerd.sock}") as engine:
        await engine.negotiate()
        stream = engine.events(filters={"type": ["container"], "event": ["create"]})
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.5)  # the stream is open before the event
        assert not first.done()
        cid = await asyncio.to_thread(lambda: dockerd.docker("create", image, "true").stdout.strip())
        async with asyncio.timeout(30):
            event = await first
        await stream.aclose()
        assert (event["Action"], event["Actor"]["ID"]) == ("create", cid)
        dockerd.docker("rm", cid)


async def test_no_engine_is_an_engine_error(tmp_path) -> None:
    async with Engine(f"unix://{tmp_path}/no-engine.sock") as engine:
        with pytest.raises(EngineError, match="cannot reach the Docker engine"):
            async for _ in engine.events(until=time.time()):
                pass


async def test_the_plain_client_learns_what_the_aiohttp_one_does(dockerd: Dockerd) -> None:
    async with Engine(f"unix://{dockerd.sock}") as engine:
        expected = await engine.negotiate()
    assert await asyncio.to_thread(WireEngine(f"unix://{dockerd.sock}").negotiate) == expected


def test_the_plain_clients_pull_raises_the_engines_refusal(dockerd: Dockerd) -> None:
    engine = WireEngine(f"unix://{dockerd.sock}")
    engine.negotiate()
    with pytest.raises(EngineError, match=r"^POST /images/create: 500 .*127\.0\.0\.1:9.*connection refused"):
        for _ in engine.pull("127.0.0.1:9/nothing", "v1"):  # the discard port: nothing listens (loopback only)
            pass


def test_the_plain_client_is_for_plain_sockets_only(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EngineError, match="cannot reach the Docker engine"):
        WireEngine(f"unix://{tmp_path}/no-engine.sock").negotiate()
    assert reachable("tcp://127.0.0.1:2375") and not reachable("https://127.0.0.1:2376")
    monkeypatch.setenv("DOCKER_TLS_VERIFY", "1")
    assert not reachable("tcp://127.0.0.1:2376")  # TLS: the aiohttp client's (dao pull's load path checks it)


def test_choosing_the_engines_own_pull_imports_no_http_library() -> None:
    """What dao pull loads before it knows the engine pulls through the local accelerator (0.1 s, not 0.3 s)."""
    code = "import sys, dao.cli, dao.pull.cli, dao.pull.native; print(sorted({'aiohttp', 'rich'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"

"""The Engine API client against a real dockerd: the typed calls the agent will use first."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

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
    # one request (/info and its Api-Version header), and what the docker CLI learns from /version
    server = dockerd.docker("version", "-f", "{{.Server.APIVersion}} {{.Server.Arch}} {{.Server.Version}}")
    api, arch, version = server.stdout.split()
    assert expected.api_version == min(api, "1.43", key=lambda v: tuple(map(int, v.split("."))))
    assert (expected.arch, expected.server_version, expected.os) == (arch, version, "linux")


@pytest.mark.parametrize("header", [True, False])
async def test_an_engine_without_the_api_version_header_is_asked_its_version(header: bool) -> None:
    """Every dockerd answer carries Api-Version, so /info alone tells the version; where it does not (a proxy
    in front that drops it), /version is asked as before. Both clients."""
    asked: list[str] = []

    class FakeEngine(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            doc = {"ApiVersion": "1.41", "Os": "linux", "Arch": "arm64", "Version": "20.10.1"}
            if self.path == "/info":
                doc = {"OSType": "linux", "Architecture": "aarch64", "ServerVersion": "20.10.1"}
            body = json.dumps(doc).encode()
            self.send_response(200)
            if header:
                self.send_header("Api-Version", "1.41")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeEngine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = f"tcp://127.0.0.1:{server.server_address[1]}"
    try:
        async with Engine(host) as engine:
            info = await engine.negotiate()
        assert await asyncio.to_thread(WireEngine(host).negotiate) == info
    finally:
        server.shutdown()
        server.server_close()
    assert (info.api_version, info.arch, info.server_version) == ("1.41", "arm64", "20.10.1")
    assert asked == (["/info"] if header else ["/info", "/version"]) * 2


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


@pytest.mark.parametrize(
    "argv, unloaded",
    [
        (["busybox"], ["aiohttp", "pydantic", "rich", "typer"]),  # plain: read before typer (dao.pull.quick)
        (["--jobs", "8", "busybox"], ["aiohttp", "pydantic", "rich"]),  # typer's, then the same engine path
    ],
)
def test_choosing_the_engines_own_pull_imports_no_http_library(
    argv: list[str], unloaded: list[str], tmp_path: Path
) -> None:
    """What dao pull loads up to asking the engine (~0.08 s, not 0.3 s): the command line read, the engine
    asked, its error said. No HTTP library, no rich, no pydantic (typer 0.29 builds a validator per option
    with it when it parses: +60 ms on every command), and for a plain command line not even typer."""
    code = (
        f"import sys; import dao.cli; sys.argv = ['dao', 'pull', *{argv!r}]\n"
        "try:\n    dao.cli.main()\nexcept SystemExit as exc:\n    print(exc.code)\n"
        f"print(sorted(set({unloaded!r}) & set(sys.modules)))"
    )
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock", "DOCKER_CONFIG": str(tmp_path)}
    env.pop("DAO_LOG", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert done.stderr.startswith("dao: error: cannot reach the Docker engine")
    assert done.stdout.split() == ["1", "[]"]

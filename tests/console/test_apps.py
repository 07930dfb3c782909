"""Apps end to end: a compose file given to the console is placed on the owner's hosts by the scheduler and
run by their agents on their real engines (the docker CLI says what runs where); scaling, constraints on
labels, a replica that fits nowhere, and deleting the app."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.console.conftest import shots, sign_in
from tests.services import images
from tests.services.console import Client, Console, agent, dao
from tests.services.dockerd import Dockerd
from tests.services.mirror import Mirror
from tests.services.procs import until, wait_until

WEB = """
  web:
    image: base:1
    command: ["sh", "-c", "while true; do echo tick; busybox sleep 1; done"]
    pull_policy: never
    restart: always
    deploy:
      replicas: {web}"""
COMPOSE = (
    "services:"
    + WEB
    + """
  batch:
    image: base:1
    command: sh -c 'busybox sleep 3600'
    pull_policy: never
    deploy:
      placement:
        constraints: ["node.labels.role == batch"]
  gpu:
    image: base:1
    pull_policy: never
    deploy:
      placement:
        constraints: ["node.labels.gpu == yes"]
"""
)


def running(engine: Dockerd, app_id: str) -> dict[str, str]:
    """The app's containers on this engine: name -> service."""
    out = engine.docker(
        "ps", "--filter", f"label=dao.app={app_id}", "--format", '{{.Names}} {{.Label "dao.service"}}'
    ).stdout.split("\n")
    return dict(line.split(" ", 1) for line in out if line.strip())


GRACE = 3.0  # --host-grace in these tests: a host away longer loses its replicas


@pytest.fixture
def pool(
    tmp_path: Path, dockerd: Dockerd, docker_mirror_port: int
) -> Iterator[tuple[Console, list[Dockerd], list[str], list]]:
    (tmp_path / "second").mkdir()
    second = Dockerd(tmp_path / "second", [f"http://127.0.0.1:{docker_mirror_port}"])  # the same mirror as the first
    layer = images.busybox_layer(tmp_path)
    console = Console(tmp_path, users=("alice",), args=("--host-grace", str(GRACE), "--min-ready", "1"))
    agents = []
    try:
        for i, engine in enumerate((dockerd, second)):
            engine.docker("import", "--change", 'CMD ["/bin/sh"]', str(layer.path), "base:1")
            config = tmp_path / f"agent{i}" / "agent.toml"  # each its own state directory
            assert console.enroll("alice", config, name=f"edge-{i + 1}").returncode == 0
            agents.append(
                agent(config, tmp_path / f"agent{i}.log", f"unix://{engine.sock}", cache=tmp_path / f"cache{i}")
            )
        wait_until(lambda: len(console.hosts()) == 2 and all(h["online"] for h in console.hosts()), 30, "online")
        ids = [h["id"] for h in console.hosts()]
        yield console, [dockerd, second], ids, agents
    finally:
        for a in agents:
            a.stop()
            assert "Traceback" not in a.output()
        console.stop()
        second.stop()
        assert "Traceback" not in console.log.read_text()


async def test_an_app_is_placed_scaled_and_removed(pool) -> None:  # type: ignore[no-untyped-def]
    console, (e1, e2), (_, h2), _ = pool
    async with Client(console.url) as alice:
        await alice.login("alice")
        await alice.json("PUT", f"/api/hosts/{h2}/labels", {"labels": {"role": "batch"}})
        status, refused = await alice.call(
            "POST", "/api/apps", {"name": "shop", "compose": "services: {x: {build: .}}"}
        )
        assert status == 400 and "services.x.build" in refused["error"]
        made = await alice.json("POST", "/api/apps", {"name": "shop", "compose": COMPOSE.format(web=2)})
        app = made["id"]

        def placed() -> tuple[list[str], list[str]]:
            return sorted(running(e1, app).values()), sorted(running(e2, app).values())

        await until(lambda: placed() == (["web"], ["batch", "web"]), 60, "two web replicas spread, batch on h2")
        view = await alice.json("GET", "/api/apps/shop")
        assert [p["replica"] for p in view["services"]["web"]["placed"]] == [0, 1]
        assert view["services"]["gpu"]["pending"] == [
            {"replica": 0, "why": "no online host satisfies node.labels.gpu == yes"}
        ]

        await alice.json("PUT", "/api/apps/shop", {"compose": COMPOSE.format(web=3)})
        await until(lambda: len(running(e1, app)) + len(running(e2, app)) == 4, 60, "a third web replica")
        web_hosts = sorted([*running(e1, app).values(), *running(e2, app).values()])
        assert web_hosts == ["batch", "web", "web", "web"]
        await alice.json("PUT", "/api/apps/shop", {"compose": COMPOSE.format(web=1)})
        await until(lambda: sorted([*running(e1, app).values(), *running(e2, app).values()]) == ["batch", "web"],
                    60, "scaled down to one")  # fmt: skip

        async with Client(console.url) as bob_less:  # nobody else's: the same 404 as for no app
            bob_less.csrf = (await bob_less.json("GET", "/api/me"))["csrf"]
            assert (await bob_less.call("GET", "/api/apps/shop"))[0] == 401
        await alice.json("DELETE", "/api/apps/shop")
        await until(lambda: not running(e1, app) and not running(e2, app), 60, "every replica removed")
        assert (await alice.call("GET", "/api/apps/shop"))[0] == 404

    # the same from a script, with an API token
    token = console.dao("console", "api-token", "alice").stdout.strip()
    compose = console.data.parent / "compose.yml"
    compose.write_text(COMPOSE.format(web=2))
    env = {"DAO_CONSOLE": console.url, "DAO_TOKEN": token}
    deployed = dao("app", "deploy", "-f", str(compose), "--name", "cli-shop", data=console.data, env=env)
    assert deployed.returncode == 0 and "cli-shop/web: 2 replica(s) of base:1" in deployed.stdout, deployed.stderr
    [listed] = json.loads(dao("app", "ls", "--json", data=console.data, env=env).stdout)
    cli_app = listed["id"]
    await until(lambda: len(running(e1, cli_app)) + len(running(e2, cli_app)) == 3, 60, "the script's app placed")

    def listing() -> str:
        return dao("app", "ls", data=console.data, env=env).stdout

    await until(lambda: "cli-shop/web  2/2 running" in listing(), 30, "the console's view to follow the engines")
    assert "cli-shop/gpu  0/1 running, 1 pending: no online host satisfies node.labels.gpu == yes" in listing()
    wrong = dao("app", "ls", data=console.data, env={**env, "DAO_TOKEN": "daoapi_guessed"})
    assert wrong.returncode == 1 and "unknown API token" in wrong.stderr and "Traceback" not in wrong.stderr

    def total() -> int:
        return len(running(e1, cli_app)) + len(running(e2, cli_app))

    scaled = dao("app", "scale", "cli-shop", "web=1", data=console.data, env=env)
    assert scaled.returncode == 0 and "cli-shop/web: 1 replica(s)" in scaled.stdout, scaled.stderr
    await until(lambda: total() == 2, 60, "web scaled to 1 (and batch)")
    wrong = dao("app", "scale", "cli-shop", "db=1", data=console.data, env=env)
    assert wrong.returncode == 1 and "has no service 'db'" in wrong.stderr
    assert dao("app", "stop", "cli-shop", data=console.data, env=env).returncode == 0
    await until(lambda: total() == 0, 60, "every replica of the stopped app removed")
    assert "(stopped)" in listing()
    assert dao("app", "start", "cli-shop", data=console.data, env=env).returncode == 0
    await until(lambda: total() == 2, 60, "the app running again, at its scale")
    deployed = dao("app", "deploy", "-f", str(compose), "--name", "cli-shop", data=console.data, env=env)
    assert deployed.returncode == 0
    await until(lambda: total() == 3, 60, "a new file: its own replica counts again")
    assert dao("app", "rm", "cli-shop", data=console.data, env=env).returncode == 0
    await until(lambda: not running(e1, cli_app) and not running(e2, cli_app), 60, "the script's app removed")


async def test_a_lost_host_s_replicas_run_elsewhere_and_no_duplicate_stays_when_it_returns(pool, tmp_path) -> None:  # type: ignore[no-untyped-def]
    console, (e1, e2), _, agents = pool
    async with Client(console.url) as alice:
        await alice.login("alice")
        app = (await alice.json("POST", "/api/apps", {"name": "web", "compose": SPREAD}))["id"]
        await until(lambda: len(running(e1, app)) == 1 and len(running(e2, app)) == 1, 60, "one replica on each")
        lost = time.monotonic()
        agents[1].kill()  # the host goes: its agent SIGKILLed, its engine stopped
        e2.proc.stop(60)
        await until(lambda: len(running(e1, app)) == 2, GRACE + 60, "both replicas on the host left")
        print(f"replaced {time.monotonic() - lost:.1f} s after the host went (grace {GRACE} s)")
        e2._start()  # back: its replica restarts with the engine (restart: always), a copy too many
        agents[1] = agent(tmp_path / "agent1" / "agent.toml", tmp_path / "agent1-again.log", f"unix://{e2.sock}")
        await until(lambda: all(h["online"] for h in console.hosts()), 30, "the host online again")
        await until(lambda: len(running(e1, app)) + len(running(e2, app)) == 2, 60, "the duplicate removed")
        await asyncio.sleep(3)  # and it stays that way
        assert len(running(e1, app)) + len(running(e2, app)) == 2
        view = await alice.json("GET", "/api/apps/web")
        assert sorted(p["replica"] for p in view["services"]["web"]["placed"]) == [0, 1]


SPREAD = "services:" + WEB.format(web=2) + "\n"


def test_the_apps_page(pool, browser, tmp_path) -> None:  # type: ignore[no-untyped-def]
    console, (e1, e2), _, _ = pool
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        sign_in(page, console.url, "alice")
        page.goto(f"{console.url}/apps")
        page.fill("#app-name", "shop")
        page.fill("#app-compose", COMPOSE.format(web=2))
        page.click("#deploy-form button[type=submit]")
        app = page.locator(".app[data-app=shop]")
        app.locator("tr[data-service=web] td.running", has_text="2/2").wait_for(timeout=60_000)
        app.locator(".pending", has_text="no online host satisfies node.labels.gpu == yes").wait_for()
        page.screenshot(path=shots(tmp_path) / "console-apps.png", full_page=True)
        page.click(".app[data-app=shop] h3 a")  # the app's own page: each replica, its logs, events, history
        page.wait_for_url(f"{console.url}/apps/shop")
        replica = page.locator("#replicas tr[data-service=web][data-replica='0']")
        replica.locator("td.health", has_text="ready").wait_for(timeout=30_000)
        replica.locator("button.logs").click()
        page.locator("#logs", has_text="tick").wait_for(timeout=30_000)
        page.locator("#app-events li", has_text="web #0 started on edge-").first.wait_for()
        page.locator("#app-pending .pending", has_text="gpu #0 pending").wait_for()
        assert page.locator("#app-versions li").count() == 1
        page.screenshot(path=shots(tmp_path) / "console-app.png", full_page=True)
        page.goto(f"{console.url}/apps")
        page.fill("#app-name", "shop")
        placed = [*running(e1, "x"), *running(e2, "x")]  # nothing of another app
        assert placed == []
        page.fill("#app-compose", "services: {web: {image: base:1, build: .}}")
        page.click("#deploy-form button[type=submit]")
        page.locator("#deploy-said.error", has_text="services.web.build is not supported").wait_for()
    finally:
        page.close()


def specs(engines: list[Dockerd], app_id: str) -> list[str]:
    """The ``dao.spec`` of each running replica of the app, on all engines."""
    out = []
    for engine in engines:
        listed = engine.docker("ps", "--filter", f"label=dao.app={app_id}", "--format", '{{.Label "dao.spec"}}')
        out += [line for line in listed.stdout.split() if line]
    return sorted(out)


async def test_a_new_spec_rolls_out_without_a_moment_below_the_replica_count(pool) -> None:  # type: ignore[no-untyped-def]
    console, engines, _, _ = pool
    async with Client(console.url) as alice:
        await alice.login("alice")
        app = (await alice.json("POST", "/api/apps", {"name": "web", "compose": SPREAD}))["id"]
        await until(lambda: len(specs(engines, app)) == 2, 60, "two replicas")
        [old] = set(specs(engines, app))
        await alice.json(
            "PUT", "/api/apps/web", {"compose": SPREAD.replace("replicas: 2", "replicas: 2\n    environment: {V: 2}")}
        )
        fewest = 2
        deadline = time.monotonic() + 90
        while True:  # polled all through the update: never fewer running than asked for
            now = specs(engines, app)
            fewest = min(fewest, len(now))
            if len(now) == 2 and old not in now:
                break
            assert time.monotonic() < deadline, f"the update did not finish: {now}"
            await asyncio.sleep(0.1)
        assert fewest >= 2, f"{fewest} replica(s) running at one point of the update"
        [new] = set(specs(engines, app))
        assert new != old


async def test_a_deploy_to_many_hosts_fetches_each_layer_from_upstream_once(  # type: ignore[no-untyped-def]
    pool, world, tmp_path: Path, docker_mirror_port: int
) -> None:
    """The replicas' image comes through the hosts' mirror (dao pull on each agent, at once): one upstream
    fetch per layer however many hosts pull it."""
    console, engines, _, _ = pool
    image = world.image("dao-test/schema2:v1")
    layers = [(layer["digest"], layer["size"]) for layer in json.loads(image.manifest)["layers"]]
    since = world.upstream.log_offset()
    mirror = Mirror(tmp_path / "mirror", world.upstream.url, port=docker_mirror_port)
    try:
        compose = SPREAD.replace("image: base:1", "image: dao-test/schema2:v1").replace("pull_policy: never", "")
        async with Client(console.url) as alice:
            await alice.login("alice")
            app = (await alice.json("POST", "/api/apps", {"name": "pulled", "compose": compose}))["id"]
            await until(lambda: all(len(running(e, app)) == 1 for e in engines), 120, "a replica on each host")
    finally:
        mirror.stop()
    for engine in engines:  # each host has the image, by its config digest
        got = engine.docker("image", "inspect", "--format", "{{.Id}}", "dao-test/schema2:v1").stdout.strip()
        assert got == json.loads(image.manifest)["config"]["digest"]
    # Each layer's bytes once (a big one in parallel ranges); the first is busybox's, which the hosts have
    # already (base:1), and dao pull fetches only what is missing.
    fetched = [sum(r.size for r in world.upstream.blob_gets(since, digest)) for digest, _ in layers]
    assert fetched == [0] + [size for _, size in layers[1:]], f"bytes from upstream per layer: {fetched}"

"""Capsule hosts with the real parts: a provider (``dao capsule serve``) that makes each capsule a network
namespace with its own dockerd and agent, two ordinary hosts in namespaces of their own, and an app whose
replicas must leave the capsule before it ends: two replicas of an HTTP service, polled every 100 ms all
through the move, and one stateful replica whose file in a named volume must keep every line."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.console.conftest import shots, sign_in
from tests.services.console import Client
from tests.services.pool import PORT, Poller, World, counted, engine_cli, exists, netns_exists, replicas
from tests.services.procs import until, wait_until

TTL, LEAD, GRACE = 80, 35, 3  # the capsule's life, --migrate-lead, --host-grace (seconds)

APP = f"""
services:
  web:
    image: base:1
    command: ["sh", "-c", "busybox mkdir -p /www && echo hello > /www/index.html &&
                           exec busybox httpd -f -p {PORT} -h /www"]
    pull_policy: never
    restart: always
    ports: ["{PORT}:{PORT}"]
    healthcheck:
      test: ["CMD", "busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:{PORT}/"]
      interval: 1s
      timeout: 1s
      retries: 2
    deploy:
      replicas: 2
  counter:
    image: base:1
    command: sh -c 'trap "exit 0" TERM; n=$$(busybox wc -l < /data/log 2>/dev/null || echo 0);
                    while true; do n=$$((n+1)); echo $$n >> /data/log; busybox sleep 0.2; done'
    pull_policy: never
    restart: always
    volumes: ["data:/data"]
    deploy:
      placement:
        constraints: ["node.labels.state == yes"]
volumes:
  data:
"""


@pytest.fixture
def world(tmp_path: Path, isolated: None) -> Iterator[World]:
    w = World(tmp_path, ("--host-grace", str(GRACE), "--min-ready", "1", "--migrate-lead", str(LEAD)))
    try:
        yield w
    finally:
        w.close()
    assert w.capsule_state() == [], "the provider, stopped, destroys its capsules"
    assert not [n for n in w.made_netns() if n.startswith("dao-cap-")]
    for a in w.agents:
        assert "Traceback" not in a.output()
    assert "Traceback" not in w.console.log.read_text()
    assert "Traceback" not in (tmp_path / "provider.log").read_text()


async def test_a_capsule_s_apps_move_before_it_ends_with_their_data_and_no_failed_request(world: World) -> None:
    w = world
    a = w.add_host(41, "edge-a")
    w.start_provider(TTL)
    wait_until(lambda: len(w.console.hosts()) == 2 and all(h["online"] for h in w.console.hosts()), 60, "online")
    async with Client(w.console.url) as alice:
        await alice.login("alice")
        asked = time.monotonic()
        capsule = await alice.json("POST", "/api/capsules", {})
        assert capsule["expires_at"] - time.time() == pytest.approx(TTL, abs=15)
        await until(lambda: any(h["id"] == capsule["host"] and h["online"] for h in w.console.hosts()), 30, "capsule")
        print(f"capsule online {time.monotonic() - asked:.1f} s after it was asked for")
        [state] = w.capsule_state()
        sock = f"unix://{state['exec_root']}/docker.sock"
        netns = state["netns"]
        assert netns_exists(netns)
        engine_cli(sock, "import", "--change", 'CMD ["/bin/sh"]', str(w.layer.path), "base:1")  # (seeded offline)
        hosts = await alice.json("GET", "/api/hosts")
        assert [h["expires_at"] for h in hosts if h["id"] == capsule["host"]] == [capsule["expires_at"]]
        await alice.json("PUT", f"/api/hosts/{capsule['host']}/labels", {"labels": {"state": "yes"}})

        app = (await alice.json("POST", "/api/apps", {"name": "shop", "compose": APP}))["id"]
        a_sock = f"unix://{a.sock}"

        def placed() -> bool:
            on_a, on_capsule = replicas(a_sock, app), replicas(sock, app)
            return sorted(on_capsule.values()) == ["counter", "web"] and list(on_a.values()) == ["web"]

        await until(placed, 90, "web on edge-a and the capsule, the counter on the capsule")

        b = w.add_host(42, "edge-b")  # the host the stateful replica can move to
        wait_until(lambda: sum(h["online"] for h in w.console.hosts()) == 4, 60, "edge-b online")
        b_id = next(h["id"] for h in w.console.hosts() if h["name"] == "edge-b")
        await alice.json("PUT", f"/api/hosts/{b_id}/labels", {"labels": {"state": "yes"}})
        b_sock = f"unix://{b.sock}"

        poller = Poller(alice)
        polling = asyncio.ensure_future(poller.run())
        try:
            await until(lambda: poller.ok >= 10, 30, "the web service answering")
            assert poller.failed == []
            lead_mark = capsule["expires_at"] - LEAD
            await asyncio.sleep(max(lead_mark - time.time() - 3, 0))
            [counter] = [n for n, s in replicas(sock, app).items() if s == "counter"]
            before = counted(sock, counter)
            assert before == list(range(1, len(before) + 1)) and len(before) > 20

            def moved() -> bool:
                return (
                    not replicas(sock, app)
                    and sorted(replicas(b_sock, app).values()) == ["counter", "web"]
                    and list(replicas(a_sock, app).values()) == ["web"]
                )

            await until(moved, capsule["expires_at"] - time.time() - 1, "every replica off the capsule before it ends")
            took = time.time() - lead_mark
            left = capsule["expires_at"] - time.time()
            print(f"every replica moved {took:.1f} s after the lead mark, {left:.0f} s before the end")
            [counter_b] = [n for n, s in replicas(b_sock, app).items() if s == "counter"]
            await asyncio.sleep(1)
            after = counted(b_sock, counter_b)
            assert after == list(range(1, len(after) + 1)), "a line lost or doubled in the move"
            assert len(after) > len(before) + 3  # everything from before, and it went on counting
            await asyncio.sleep(3)
        finally:
            poller.stop.set()
            await polling
        assert poller.failed == [], poller.failed
        assert len(poller.served_by) >= 3, poller.served_by  # the capsule's replica, then the new one
        print(f"{poller.ok} requests, none failed")
        down = re.findall(r"moved \S+ from \S+ to \S+ in ([\d.]+) s: down ([\d.]+) s", w.console.log.read_text())
        print(f"stateful move (total s, down s): {down}")
        assert down, "the console logs the stateful move"

        # the end: the capsule's host is revoked, and nothing of the capsule is left on the machine
        await asyncio.sleep(max(capsule["expires_at"] - time.time(), 0))

        def gone() -> bool:
            return not netns_exists(netns) and not w.capsule_state() and not exists(state["dir"])

        await until(gone, 60, "the capsule destroyed")
        assert not exists(state["exec_root"])
        assert engine_cli(sock, "version", check=False).returncode != 0  # its dockerd is gone
        assert not [pid for pid in state["pids"] if exists(f"/proc/{pid}")]

        def ended() -> bool:  # (the console looks for ended capsules every 2 s: the provider may be quicker)
            [host] = [h for h in w.console.hosts() if h["id"] == capsule["host"]]
            return bool(host["revoked"]) and not host["online"]

        await until(ended, 10, "the capsule's host revoked and offline")
        listed = await alice.json("GET", "/api/capsules")
        assert [c["ended"] for c in listed] == [True]
        view = await alice.json("GET", "/api/apps/shop")
        assert {p["host"] for s in view["services"].values() for p in s["placed"]} <= {
            b_id,
            *(h["id"] for h in w.console.hosts() if h["name"] == "edge-a"),
        }


IDLE = """
services:
  idle:
    image: base:1
    command: ["sh", "-c", "trap 'exit 0' TERM; while true; do busybox sleep 1; done"]
    pull_policy: never
    deploy:
      replicas: 2
"""


def test_the_capsule_pages(world: World, browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """In the browser: a free capsule host from the Add host page, its countdown, an app placed on it, and,
    the user having no other host, the replicas on a new capsule the console made for them once the lead mark
    has passed."""
    w = world
    ttl = LEAD + 40  # the countdown starts at 1:15
    w.start_provider(ttl)
    wait_until(lambda: sum(h["online"] for h in w.console.hosts()) == 1, 60, "the provider online")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        sign_in(page, w.console.url, "alice")
        page.goto(f"{w.console.url}/hosts/add")
        page.click("#new-capsule")
        page.locator("#capsule-said", has_text="is up").wait_for(timeout=60_000)
        made = page.locator("#capsules li").first
        made.locator(".countdown", has_text=re.compile(r"^1:[01]\d left$")).wait_for()
        [first] = w.capsule_state()
        seed(w, first)
        page.screenshot(path=shots(tmp_path) / "console-capsule.png", full_page=True)
        capsule_host = made.get_attribute("data-host")

        page.goto(f"{w.console.url}/apps")
        page.fill("#app-name", "idle")
        page.fill("#app-compose", IDLE)
        page.click("#deploy-form button[type=submit]")
        on_capsule = page.locator(f".replica[data-host='{capsule_host}']", has_text="running")
        on_capsule.first.locator(".countdown").wait_for(timeout=60_000)  # a replica on a capsule shows its end
        page.locator(".app[data-app=idle] td.running", has_text="2/2").wait_for(timeout=30_000)
        page.screenshot(path=shots(tmp_path) / "console-apps-capsule.png", full_page=True)
        page.goto(f"{w.console.url}/")
        page.locator(f"tr[data-host='{capsule_host}'] .countdown").wait_for()
        page.screenshot(path=shots(tmp_path) / "console-hosts-capsule.png", full_page=True)

        # at the lead mark the replicas have nowhere to go: the console makes the user a new capsule
        wait_until(lambda: len(w.capsule_state()) == 2, ttl - 10, "a second capsule, made by the console")
        [second] = [c for c in w.capsule_state() if c["id"] != first["id"]]
        seed(w, second)
        page.goto(f"{w.console.url}/apps")
        # (the page fills its list after loading: "detached" alone would hold before anything is shown)
        moved = page.locator(".app[data-app=idle] .replica", has_text=f"capsule-{second['id']}")
        moved.nth(1).wait_for(timeout=60_000)
        page.locator(f".replica[data-host='{capsule_host}']").first.wait_for(state="detached", timeout=60_000)
        page.locator(".app[data-app=idle] td.running", has_text="2/2").wait_for(timeout=30_000)
        texts = page.locator(".app[data-app=idle] .replica").all_inner_texts()
        assert len(texts) == 2 and all(f"capsule-{second['id']}" in t for t in texts), texts
        page.screenshot(path=shots(tmp_path) / "console-apps-moved.png", full_page=True)
    finally:
        page.close()


def seed(w: World, capsule: dict) -> None:
    """The test image, into a capsule's engine (offline: nothing can be pulled here)."""
    sock = f"unix://{capsule['exec_root']}/docker.sock"
    wait_until(lambda: engine_cli(sock, "version", check=False).returncode == 0, 60, "the capsule's engine")
    engine_cli(sock, "import", "--change", 'CMD ["/bin/sh"]', str(w.layer.path), "base:1")

#!/usr/bin/env python3
"""Apps on a pool of real hosts: deploy time, recovery after a host dies, and a move off an expiring capsule.

    .venv/bin/python bench/apps.py [--workdir DIR]

Three hosts, each a network namespace with its own dockerd and dao agent, and a capsule provider on the
same machine (all in a private network namespace). Measured:

- **deploy**: from ``dao app deploy`` to every replica healthy in the console's view (``ready``), for 1 and
  for 10 replicas over the 3 hosts. Beside it, the floor: the same containers made with ``docker run``
  straight on each host's engine (no console, no agent), until ``docker inspect`` says healthy.
- **recovery**: one of 3 hosts dies (its agent SIGKILLed, its dockerd stopped); the time until its replica
  is healthy elsewhere, with ``--host-grace`` printed beside it (the time dao waits on purpose).
- **migration**: an app on a capsule (2 HTTP replicas, one on the capsule, and a stateful counter on it):
  the time from the lead mark to every replica moved, the requests that failed meanwhile (a client that
  follows the endpoints sends one every 100 ms), and the stateful replica's downtime. No other tool moves
  anything ahead of a known expiry (a spot-termination handler gets 2 minutes' notice and only evicts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from tests.services.console import Client, dao  # noqa: E402
from tests.services.pool import PORT, Poller, World, engine_cli, replicas  # noqa: E402
from tests.services.procs import until  # noqa: E402

from bench.common import run_isolated  # noqa: E402

GRACE, LEAD, MIN_READY = 10, 45, 1
IDLE_LOOP = "trap 'exit 0' TERM; while true; do busybox sleep 1; done"
HEALTH = """
    healthcheck:
      test: ["CMD", "true"]
      interval: 1s
      timeout: 1s
      retries: 2"""


def idle(replicas_: int) -> str:
    return f"""
services:
  idle:
    image: base:1
    command: ["sh", "-c", "{IDLE_LOOP}"]
    pull_policy: never{HEALTH}
    deploy:
      replicas: {replicas_}
"""


MOVING = f"""
services:
  web:
    image: base:1
    command: ["sh", "-c", "busybox mkdir -p /www && echo hello > /www/index.html &&
                           exec busybox httpd -f -p {PORT} -h /www"]
    pull_policy: never
    ports: ["{PORT}:{PORT}"]
    healthcheck:
      test: ["CMD", "busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:{PORT}/"]
      interval: 1s
      timeout: 1s
      retries: 2
    deploy:
      replicas: 2
      placement:
        constraints: ["node.labels.web == yes"]
  counter:
    image: base:1
    command: sh -c 'trap "exit 0" TERM; n=$$(busybox wc -l < /data/log 2>/dev/null || echo 0);
                    while true; do n=$$((n+1)); echo $$n >> /data/log; busybox sleep 0.2; done'
    pull_policy: never
    volumes: ["data:/data"]
    deploy:
      placement:
        constraints: ["node.labels.state == yes"]
volumes:
  data:
"""


async def all_ready(alice: Client, app: str, count: int, within: float) -> float:
    began = time.monotonic()
    while time.monotonic() - began < within:
        view = await alice.json("GET", f"/api/apps/{app}")
        ready = [p for s in view["services"].values() for p in s["placed"] if p["ready"] and not p["draining"]]
        if len(ready) >= count:
            return time.monotonic()
        await asyncio.sleep(0.1)
    raise SystemExit(f"{app}: not {count} replicas ready within {within} s")


def docker_run_floor(socks: list[str], count: int, tag: str) -> float:
    """The same containers made straight on the engines, spread round robin, until each is healthy."""
    began = time.monotonic()
    names = []
    for i in range(count):
        sock = socks[i % len(socks)]
        name = f"floor-{tag}-{i}"
        engine_cli(
            sock, "run", "-d", "--name", name, "--network", "host", "--health-cmd", "true", "--health-interval",
            "1s", "--health-retries", "2", "base:1", "sh", "-c", IDLE_LOOP,
        )  # fmt: skip
        names.append((sock, name))
    deadline = began + 120
    while True:
        states = [engine_cli(s, "inspect", "-f", "{{.State.Health.Status}}", n).stdout.strip() for s, n in names]
        if all(st == "healthy" for st in states):
            took = time.monotonic() - began
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"docker run: not healthy within 120 s: {states}")
        time.sleep(0.1)
    for sock, name in names:
        engine_cli(sock, "rm", "-f", name)
    return took


async def bench(args: argparse.Namespace, tmp: Path) -> None:
    w = World(tmp, ("--host-grace", str(GRACE), "--min-ready", str(MIN_READY), "--migrate-lead", str(LEAD)))
    rows: list[tuple[str, str, str]] = []
    try:
        engines = [w.add_host(51 + i, f"edge-{i + 1}") for i in range(3)]
        socks = [f"unix://{e.sock}" for e in engines]
        token = w.console.dao("console", "api-token", "alice").stdout.strip()
        env = {"DAO_CONSOLE": w.console.url, "DAO_TOKEN": token}
        async with Client(w.console.url) as alice:
            await alice.login("alice")
            await until(lambda: sum(h["online"] for h in w.console.hosts()) == 3, 60, "3 hosts online")

            for count in (1, 10):
                name = f"idle{count}"
                compose = tmp / f"{name}.yml"
                compose.write_text(idle(count))
                began = time.monotonic()
                done = dao("app", "deploy", "-f", str(compose), "--name", name, data=w.console.data, env=env)
                assert done.returncode == 0, done.stderr
                took = await all_ready(alice, name, count, 120) - began
                floor = docker_run_floor(socks, count, str(count))
                rows.append(
                    (f"deploy {count} replica(s) over 3 hosts, to all healthy", f"{took:.1f} s", f"{floor:.1f} s")
                )
                dao("app", "rm", name, data=w.console.data, env=env)
                await asyncio.sleep(3)

            # recovery: 3 replicas, one per host; the third host dies
            compose = tmp / "spread.yml"
            compose.write_text(idle(3))
            dao("app", "deploy", "-f", str(compose), "--name", "spread", data=w.console.data, env=env)
            await all_ready(alice, "spread", 3, 120)
            app_id = (await alice.json("GET", "/api/apps/spread"))["id"]
            assert all(len(replicas(s, app_id)) == 1 for s in socks), "one replica per host"
            dead = next(h["id"] for h in w.console.hosts() if h["name"] == "edge-3")
            died = time.monotonic()
            w.agents[2].kill()
            engines[2].proc.stop(60)
            for _ in range(int((GRACE + 120) / 0.1)):
                view = await alice.json("GET", "/api/apps/spread")
                ready = [p for p in view["services"]["idle"]["placed"] if p["ready"] and p["host"] != dead]
                if len(ready) == 3:
                    break
                await asyncio.sleep(0.1)
            else:
                raise SystemExit("the dead host's replica was not placed again")
            rows.append(("recovery: a host dies, its replica healthy elsewhere", f"{time.monotonic() - died:.1f} s",
                         f"(--host-grace {GRACE} s of it on purpose)"))  # fmt: skip
            dao("app", "rm", "spread", data=w.console.data, env=env)
            await asyncio.sleep(3)

            # migration off a capsule
            w.start_provider(LEAD + 45)
            await until(
                lambda: any("provider" in h["facts"] and h["online"] for h in w.console.hosts()), 60, "the provider"
            )
            capsule = await alice.json("POST", "/api/capsules", {})
            [state] = w.capsule_state()
            capsule_sock = f"unix://{state['exec_root']}/docker.sock"
            engine_cli(capsule_sock, "import", "--change", 'CMD ["/bin/sh"]', str(w.layer.path), "base:1")
            hosts = {h["name"]: h["id"] for h in await alice.json("GET", "/api/hosts")}

            async def label(host_id: str, labels: dict[str, str]) -> None:
                await alice.json("PUT", f"/api/hosts/{host_id}/labels", {"labels": labels})

            # placed first on edge-1 and the capsule (web) and the capsule (counter); edge-2 takes them later
            await label(capsule["host"], {"state": "yes", "web": "yes"})
            await label(hosts["edge-1"], {"web": "yes"})
            await alice.json("POST", "/api/apps", {"name": "shop", "compose": MOVING})
            app_id = (await alice.json("GET", "/api/apps/shop"))["id"]
            await all_ready(alice, "shop", 3, 120)
            assert sorted(replicas(capsule_sock, app_id).values()) == ["counter", "web"]
            await label(hosts["edge-2"], {"state": "yes", "web": "yes"})
            poller = Poller(alice)
            polling = asyncio.ensure_future(poller.run())
            lead_mark = capsule["expires_at"] - LEAD
            await asyncio.sleep(max(lead_mark - time.time(), 0))
            await until(lambda: not replicas(capsule_sock, app_id), LEAD, "every replica off the capsule")
            await all_ready(alice, "shop", 3, 60)
            moved = time.time() - lead_mark
            await asyncio.sleep(3)
            poller.stop.set()
            await polling
            down = re.findall(r"down ([\d.]+) s", w.console.log.read_text())
            rows.append(
                ("migration: lead mark to every replica moved", f"{moved:.1f} s", "(no tool moves ahead of an expiry)")
            )
            rows.append(
                (
                    "  requests that failed meanwhile (one per 100 ms)",
                    f"{len(poller.failed)} of {poller.ok + len(poller.failed)}",
                    "",
                )
            )
            rows.append(
                ("  stateful replica's downtime (stop, copy, start)", f"{float(down[-1]):.1f} s" if down else "?", "")
            )
    finally:
        width = max([len(r[0]) for r in rows] or [0])
        print(f"\n{'':{width}}  {'dao':>10}  reference (docker run on the engines directly)")
        for label, ours, ref in rows:
            print(f"{label:{width}}  {ours:>10}  {ref}")
        (tmp / "result.json").write_text(json.dumps(rows))
        w.close()


def run(args: argparse.Namespace, tmp: Path) -> None:
    asyncio.run(bench(args, tmp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary directory)")
    run_isolated(parser.parse_args(), run, "dao-bench-apps-")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Many agents on one console: how long they take to connect, what the console costs while it holds them,
how fast a command goes console -> agent -> console under that load, and how they come back after the
console is killed.

    .venv/bin/python bench/console_agents.py [--agents 1000] [--db sqlite|postgres|both] [--steady 60]
    .venv/bin/python bench/console_agents.py --nodes 2 [--agents 1000]   # two console nodes (--redis)

The agents are real protocol clients (dao's frames over the WebSocket the real agent dials), many per
process in ``--workers`` processes: each enrols with its own one-time token, says hello, answers pings,
sends one metrics sample every ``--interval`` seconds (first ones spread over an interval, as hosts that
started at different times), answers commands at once, and reconnects with the real agent's full-jitter
backoff. Commands are sent as a user of the console would: ``POST /api/hosts/{id}/containers/web/stop``,
timed from the request to its answer. Everything runs on loopback, in a private network namespace.
There is no reference tool to run beside it (Portainer Edge is not packaged): the issue's targets are
printed next to the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

import aiohttp  # noqa: E402
import psutil  # noqa: E402

from bench.common import run_isolated  # noqa: E402
from dao.agent.run import RECONNECT_BASE, RECONNECT_CAP  # noqa: E402
from dao.aio import full_jitter  # noqa: E402
from dao.channel.frames import MAX_FRAME, Command, Hello, Metrics, Ping, Pong, Result, decode, encode  # noqa: E402

DAO = ROOT / ".venv" / "bin" / "dao"
PASSWORD = "benchmark password"


def raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the simulated agents (a worker process) -------------------------------------------------------------------


async def one_agent(url: str, host: str, credential: str, interval: float, say: callable) -> None:  # type: ignore[valid-type]
    attempt = 0
    connections = 0
    seq = 0
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            try:
                async with session.ws_connect(
                    url, headers={"Authorization": f"Bearer {credential}"}, heartbeat=None, max_msg_size=MAX_FRAME
                ) as ws:
                    facts = {"hostname": host, "os": "bench", "kernel": "0", "cpus": 1, "mem_total": 1 << 30}
                    await ws.send_str(encode(Hello("bench", facts, [])))
                    first = await ws.receive(timeout=60)
                    decode(first.data)
                    connections += 1
                    attempt = 0
                    say({"ev": "welcome", "host": host, "n": connections, "t": time.time()})

                    async def metrics() -> None:
                        nonlocal seq
                        await asyncio.sleep(random.uniform(0, interval))
                        while True:
                            seq += 1
                            sample = {"at": time.time(), "cpu": random.uniform(0, 100), "mem_used": 1, "mem_total": 2}
                            await ws.send_str(encode(Metrics(seq, [sample])))
                            await asyncio.sleep(interval)

                    sender = asyncio.ensure_future(metrics())
                    try:
                        async for msg in ws:
                            if msg.type != aiohttp.WSMsgType.TEXT:
                                break
                            frame = decode(msg.data)
                            if isinstance(frame, Ping):
                                await ws.send_str(encode(Pong(frame.at)))
                            elif isinstance(frame, Command):
                                data = {"id": frame.args.get("id"), "done": frame.op.rsplit(".", 1)[-1]}
                                await ws.send_str(encode(Result(frame.id, True, data)))
                    finally:
                        sender.cancel()
            except (aiohttp.ClientError, TimeoutError, ConnectionError, ValueError):
                pass
            attempt += 1
            await asyncio.sleep(full_jitter(attempt, RECONNECT_BASE, RECONNECT_CAP))


async def worker(url: str, credentials: Path, first: int, last: int, interval: float) -> None:
    raise_fd_limit()
    hosts = json.loads(await asyncio.to_thread(credentials.read_text))[first:last]

    def say(event: dict) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    await asyncio.gather(*(one_agent(url, h["host"], h["credential"], interval, say) for h in hosts))


# -- the run -----------------------------------------------------------------------------------------------------


class Console:
    def __init__(self, data: Path, port: int, database: str | None, log: Path, extra: tuple[str, ...] = ()) -> None:
        self.argv = [str(DAO), "console", "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data), *extra]
        if database:
            self.argv += ["--database", database]
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=self.log.open("a"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                import urllib.request

                urllib.request.urlopen(f"{self.url}/login", timeout=2).read()
                return
            time.sleep(0.1)
        raise RuntimeError("the console did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def dao(*args: str, stdin: str | None = None) -> None:
    subprocess.run([str(DAO), *args], check=True, capture_output=True, text=True, input=stdin, timeout=120)


async def enroll_all(url: str, tokens: list[str]) -> list[dict]:
    out: list[dict] = []
    gate = asyncio.Semaphore(32)
    async with aiohttp.ClientSession() as s:

        async def one(i: int, token: str) -> None:
            async with gate, s.post(f"{url}/api/agent/enroll", json={"token": token, "name": f"bench-{i:04d}"}) as r:
                out.append(await r.json())

        await asyncio.gather(*(one(i, t) for i, t in enumerate(tokens)))
    return out


class Events:
    """What the workers say, read from their stdout on threads: the welcomes, by host and connection."""

    def __init__(self, procs: list[subprocess.Popen]) -> None:
        import threading

        self.welcomes: list[dict] = []
        self.lock = threading.Lock()
        for p in procs:
            threading.Thread(target=self._read, args=(p,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            event = json.loads(line)
            with self.lock:
                self.welcomes.append(event)

    def connected(self, n: int) -> list[dict]:
        """The first welcome of each host on its ``n``-th connection or later."""
        with self.lock:
            seen: dict[str, dict] = {}
            for e in self.welcomes:
                if e["n"] >= n and e["host"] not in seen:
                    seen[e["host"]] = e
            return list(seen.values())


def wait_all(events: Events, n: int, count: int, limit: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if len(events.connected(n)) >= count:
            return time.monotonic() - start
        time.sleep(0.1)
    return None


def watch(pid: int, seconds: float) -> tuple[float, int]:
    """The console's CPU (% of one core) over ``seconds``, and its peak RSS meanwhile."""
    proc = psutil.Process(pid)
    before, peak = proc.cpu_times(), proc.memory_info().rss
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.5)
        peak = max(peak, proc.memory_info().rss)
    after = proc.cpu_times()
    return 100 * ((after.user - before.user) + (after.system - before.system)) / seconds, peak


async def round_trips(url: str, hosts: list[str], count: int, at_once: int) -> list[float]:
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as s:
        csrf = (await (await s.get(f"{url}/api/me")).json())["csrf"]
        await s.post(f"{url}/api/login", json={"name": "bench", "password": PASSWORD}, headers={"X-CSRF-Token": csrf})
        csrf = (await (await s.get(f"{url}/api/me")).json())["csrf"]
        times: list[float] = []
        gate = asyncio.Semaphore(at_once)

        async def one() -> None:
            async with gate:
                host = random.choice(hosts)
                start = time.perf_counter()
                async with s.post(f"{url}/api/hosts/{host}/containers/web/stop", headers={"X-CSRF-Token": csrf}) as r:
                    body = await r.read()
                    if r.status == 200:
                        times.append(time.perf_counter() - start)
                    elif os.environ.get("DAO_BENCH_DEBUG"):
                        print(r.status, body[:200], file=sys.stderr)
                await asyncio.sleep(0.05)

        await asyncio.gather(*(one() for _ in range(count)))
    return times


def run_nodes(args: argparse.Namespace, work: Path) -> dict:
    """Two console nodes (``--redis``) on one PostgreSQL: the agents' workers dial them in turn; commands are
    asked of the first node, for hosts on it and for hosts on the other (routed through Redis)."""
    from tests.services.postgres import Postgres
    from tests.services.procs import free_port
    from tests.services.redis import Redis

    data = work / "nodes"
    data.mkdir()
    pg, redis = Postgres(), Redis(work / "redis")
    database = pg.create_database("console")
    flags = ["--data-dir", str(data), "--database", database]
    dao("mirror", "users", "add", "bench", "--id", "bench", *flags)
    dao("console", "users", "add", "bench", "--password-stdin", *flags, stdin=PASSWORD + "\n")
    from dao.console.store import Store

    store = Store(database)
    tokens = [store.issue_token("bench") for _ in range(args.agents)]
    store.close()
    extra = ("--redis", redis.url, "--secret-file", str(work / "console.secret"))
    nodes = [Console(data, free_port(), database, work / f"console-node{i}.log", extra) for i in range(2)]
    procs: list[subprocess.Popen] = []
    result: dict = {"backend": "2 nodes"}
    try:
        for node in nodes:
            node.start()
        enrolled = asyncio.run(enroll_all(nodes[0].url, tokens))
        creds = work / "credentials-nodes.json"
        creds.write_text(json.dumps(enrolled))
        share = -(-args.agents // args.workers)
        on: list[list[str]] = [[], []]
        for w in range(args.workers):
            first, last = w * share, min((w + 1) * share, args.agents)
            channel = nodes[w % 2].url.replace("http", "ws") + "/api/agent/channel"
            on[w % 2] += [h["host"] for h in enrolled[first:last]]
            argv = [sys.executable, __file__, "--worker", channel, str(creds), str(first), str(last),
                    str(args.interval)]  # fmt: skip
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
        events = Events(procs)
        took = wait_all(events, 1, args.agents, 300)
        result["connect_s"] = took if took is not None else float("nan")
        print(f"[2 nodes] {len(events.connected(1))} agents connected in {took} s", flush=True)
        time.sleep(3)  # (each node's view of the other's channels is refreshed every 2 s)
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            watched = list(pool.map(lambda n: watch(n.proc.pid, args.steady), nodes))  # type: ignore[union-attr]
        result["cpu_pct"] = max(w[0] for w in watched)
        result["rss"] = max(w[1] for w in watched)
        for label, hosts in (("local", on[0]), ("routed", on[1])):
            times = asyncio.run(round_trips(nodes[0].url, hosts, args.commands // 2, 4))
            result[f"{label}_n"] = len(times)
            result[f"{label}_p50_ms"] = 1000 * statistics.median(times) if times else float("nan")
            result[f"{label}_p99_ms"] = (
                1000 * statistics.quantiles(times, n=100)[98] if len(times) >= 100 else float("nan")
            )
    finally:
        for p in procs:
            p.kill()
        for node in nodes:
            node.stop()
        redis.stop()
        pg.stop()
    return result


def run_one(args: argparse.Namespace, work: Path, backend: str) -> dict:
    from tests.services.procs import free_port

    data = work / backend
    data.mkdir()
    pg = None
    database = None
    if backend == "postgres":
        from tests.services.postgres import Postgres

        pg = Postgres()
        database = pg.create_database("console")
    flags = ["--data-dir", str(data)] + (["--database", database] if database else [])
    dao("mirror", "users", "add", "bench", "--id", "bench", *flags)
    dao("console", "users", "add", "bench", "--password-stdin", *flags, stdin=PASSWORD + "\n")
    from dao.console.store import Store

    store = Store(database or f"sqlite:///{data}/dao.db")
    tokens = [store.issue_token("bench") for _ in range(args.agents)]
    store.close()
    console = Console(data, free_port(), database, work / f"console-{backend}.log")
    procs: list[subprocess.Popen] = []
    result: dict = {"backend": backend}
    try:
        console.start()
        enrolled = asyncio.run(enroll_all(console.url, tokens))
        creds = work / f"credentials-{backend}.json"
        creds.write_text(json.dumps(enrolled))
        channel = console.url.replace("http", "ws") + "/api/agent/channel"
        share = -(-args.agents // args.workers)
        for w in range(args.workers):
            argv = [sys.executable, __file__, "--worker", channel, str(creds), str(w * share),
                    str(min((w + 1) * share, args.agents)), str(args.interval)]  # fmt: skip
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
        events = Events(procs)
        took = wait_all(events, 1, args.agents, 300)
        result["connect_s"] = took if took is not None else float("nan")
        print(f"[{backend}] {len(events.connected(1))} agents connected in {took} s", flush=True)
        assert console.proc is not None
        result["cpu_pct"], result["rss"] = watch(console.proc.pid, args.steady)
        times = asyncio.run(round_trips(console.url, [h["host"] for h in enrolled], args.commands, 4))
        result["commands"] = len(times)
        result["p50_ms"] = 1000 * statistics.median(times) if times else float("nan")
        result["p99_ms"] = 1000 * statistics.quantiles(times, n=100)[98] if len(times) >= 100 else float("nan")

        console.kill()
        console.start()
        restarted = time.time()
        back = wait_all(events, 2, args.agents, 300)
        result["back_s"] = back if back is not None else float("nan")
        arrivals = sorted(e["t"] - restarted for e in events.connected(2))
        result["histogram"] = histogram(arrivals, 1.0)
    finally:
        for p in procs:
            p.kill()
        console.stop()
        if pg is not None:
            pg.stop()
    return result


def histogram(values: list[float], width: float) -> list[tuple[str, int]]:
    if not values:
        return []
    buckets: dict[int, int] = {}
    for v in values:
        buckets[int(max(v, 0) // width)] = buckets.get(int(max(v, 0) // width), 0) + 1
    return [(f"{int(b * width)}-{int((b + 1) * width)} s", buckets.get(b, 0)) for b in range(max(buckets) + 1)]


def main_run(args: argparse.Namespace, work: Path) -> None:
    raise_fd_limit()
    if args.nodes == 2:
        r = run_nodes(args, work)
        print()
        print(f"{args.agents} agents over 2 console nodes (half on each), a sample every {args.interval:g} s each, "
              f"{args.steady:g} s steady, commands asked of node 1")  # fmt: skip
        print(f"{'time to connect all (s)':44}{r['connect_s']:>10.1f}")
        print(f"{'busiest node CPU, % of one core':44}{r['cpu_pct']:>10.0f}")
        print(f"{'largest node peak RSS (MiB)':44}{r['rss'] / (1 << 20):>10.0f}")
        for label in ("local", "routed"):
            where = "on node 1" if label == "local" else "on node 2, routed"
            print(f"{f'command round trip p50, host {where} (ms)':44}{r[f'{label}_p50_ms']:>10.1f}")
            print(f"{f'command round trip p99, host {where} (ms)':44}{r[f'{label}_p99_ms']:>10.1f}"
                  f"   ({r[f'{label}_n']} commands)")  # fmt: skip
        return
    backends = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    results = [run_one(args, work, b) for b in backends]
    print()
    print(f"{args.agents} agents, a sample every {args.interval:g} s each, {args.steady:g} s steady, "
          f"{args.commands} commands")  # fmt: skip
    header = f"{'':34}" + "".join(f"{r['backend']:>14}" for r in results) + f"{'target':>16}"
    print(header)
    rows = [
        ("time to connect all (s)", "connect_s", "{:.1f}", ""),
        ("console CPU, % of one core", "cpu_pct", "{:.0f}", "< 100"),
        ("console peak RSS (MiB)", "rss", "{:.0f}", "< 400"),
        ("command round trip p50 (ms)", "p50_ms", "{:.1f}", ""),
        ("command round trip p99 (ms)", "p99_ms", "{:.1f}", "< 250"),
        ("all back after a restart (s)", "back_s", "{:.1f}", "< 60"),
    ]
    for label, key, fmt, target in rows:
        cells = "".join(f"{fmt.format(r[key] / (1 << 20) if key == 'rss' else r[key]):>14}" for r in results)
        print(f"{label:34}{cells}{target:>16}")
    for r in results:
        print(f"\nreconnects after the restart ({r['backend']}), by seconds since it:")
        for label, n in r["histogram"]:
            print(f"  {label:>10} {'#' * max(1, n * 60 // args.agents) if n else ''} {n}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        url, creds, first, last, interval = sys.argv[2:7]
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(worker(url, Path(creds), int(first), int(last), float(interval)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4, help="processes the agents are spread over")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between an agent's samples")
    parser.add_argument("--steady", type=float, default=60.0, help="seconds of steady state measured")
    parser.add_argument("--commands", type=int, default=400)
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--nodes", type=int, choices=[1, 2], default=1, help="2: console nodes on PostgreSQL + Redis")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    run_isolated(args, main_run, "dao-bench-console-")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

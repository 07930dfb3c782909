"""A pool of hosts for the apps and capsules tests and benchmarks: hosts in network namespaces of their own,
each with its own dockerd and agent (replicas on the host network, so a published port is the host's), a
capsule provider, and a client that follows an app's endpoints as a load balancer would."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp

from tests.services import images
from tests.services.console import Client, Console
from tests.services.dockerd import DOCKER_CLI, Dockerd
from tests.services.mirror import DAO
from tests.services.netns import NetHost
from tests.services.procs import Process

PORT = 8080  # the apps' HTTP port, open into every host
SUBNET = "10.216"  # the capsules' links


def engine_cli(sock: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DOCKER_CLI, "-H", sock, *args], capture_output=True, text=True, timeout=120, check=check)


def replicas(sock: str, app: str) -> dict[str, str]:
    """The app's running containers on an engine: name -> service."""
    out = engine_cli(sock, "ps", "--filter", f"label=dao.app={app}", "--format", '{{.Names}} {{.Label "dao.service"}}')
    return dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.strip())


class World:
    def __init__(self, tmp: Path, console_args: tuple[str, ...]) -> None:
        self.tmp = tmp
        self.layer = images.busybox_layer(tmp)
        self.console = Console(tmp, users=("alice",), listen="0.0.0.0", args=console_args)
        self.hosts: list[NetHost] = []
        self.engines: list[Dockerd] = []
        self.agents: list[Process] = []
        self.provider: Process | None = None
        self.capsules_seen: set[str] = set()

    def add_host(self, index: int, name: str) -> Dockerd:
        host = NetHost(index, open_ports=(PORT,))
        self.hosts.append(host)
        (self.tmp / name).mkdir()
        engine = Dockerd(self.tmp / name, [], prefix=host.run())
        self.engines.append(engine)
        engine.docker("import", "--change", 'CMD ["/bin/sh"]', str(self.layer.path), "base:1")
        config = self.tmp / name / "agent.toml"
        url = f"http://{host.outside}:{self.console.port}"
        enrolled = subprocess.run(
            host.run(DAO, "agent", "enroll", "--console", url, "--token", self.console.token("alice"),
                     "--config", str(config), "--name", name),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert enrolled.returncode == 0, enrolled.stderr
        argv = [DAO, "agent", "run", "--config", str(config), "--interval", "0.5", "--app-network", "host"]
        self.agents.append(Process(host.run(*argv), self.tmp / f"{name}.log", {"DOCKER_HOST": f"unix://{engine.sock}"}))
        return engine

    def start_provider(self, ttl: float) -> None:
        self.provider = Process(
            [DAO, "capsule", "serve", "--console", self.console.url, "--token", self.console.token("alice"),
             "--ttl", str(ttl), "--max", "2", "--state-dir", str(self.tmp / "provider"), "--subnet", SUBNET,
             "--no-nat", "--capsule-console", f"http://{{gateway}}:{self.console.port}",
             "--dockerd-arg=--bridge=none", "--dockerd-arg=--iptables=false",
             "--agent-arg=--app-network=host", "--agent-arg=--interval=0.5"],
            self.tmp / "provider.log",
        )  # fmt: skip

    def made_netns(self) -> list[str]:
        """The network namespaces of this pool's capsules that still exist."""
        names = {f"dao-cap-{c}" for c in self.capsules_seen}
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
        return [n for n in listed if n in names]

    def capsule_state(self) -> list[dict]:
        try:
            found = json.loads((self.tmp / "provider" / "capsules.json").read_text())
        except (OSError, ValueError):
            return []
        self.capsules_seen |= {c["id"] for c in found}
        return found

    def close(self) -> None:
        self.capsule_state()  # (what made_netns checks afterwards)
        for a in self.agents:
            a.stop()
        if self.provider is not None:
            self.provider.stop(90)  # it destroys its capsules on the way out
        for engine in self.engines:
            if engine.proc.proc.poll() is not None:  # stopped on purpose (a host that died)
                shutil.rmtree(engine.exec_root, ignore_errors=True)
                continue
            for name in engine.docker("ps", "-aq").stdout.split():
                engine.docker("rm", "-f", name, check=False)
            engine.stop()
        for host in self.hosts:
            host.close()
        self.console.stop()


class Poller:
    """A client of the web service as a load balancer would be: it follows the app's endpoints (the console's
    JSON API) and sends one request every 100 ms to the next one, round robin."""

    def __init__(self, alice: Client, app: str = "shop", service: str = "web") -> None:
        self.alice, self.app, self.service = alice, app, service
        self.ok = 0
        self.failed: list[str] = []
        self.served_by: set[str] = set()
        self.stop = asyncio.Event()

    async def run(self) -> None:
        turn = 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while not self.stop.is_set():
                began = time.monotonic()
                view = await self.alice.json("GET", f"/api/apps/{self.app}")
                endpoints = [e for p in view["services"][self.service]["placed"] for e in p["endpoints"]]
                if endpoints:
                    target = endpoints[turn % len(endpoints)]
                    turn += 1
                    try:
                        async with http.get(f"http://{target}/") as resp:
                            body = await resp.text()
                            if resp.status == 200 and body == "hello\n":
                                self.ok += 1
                                self.served_by.add(target)
                            else:
                                self.failed.append(f"{target}: {resp.status}")
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        self.failed.append(f"{target}: {exc.__class__.__name__} {exc}")
                await asyncio.sleep(max(0.1 - (time.monotonic() - began), 0))


def netns_exists(name: str) -> bool:
    return name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()


def exists(path: str) -> bool:
    return Path(path).exists()


def counted(sock: str, container: str) -> list[int]:
    out = engine_cli(sock, "exec", container, "cat", "/data/log").stdout
    return [int(line) for line in out.split()]

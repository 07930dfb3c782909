"""Peers: four hosts (network namespaces, each with its own dockerd, and an agent that runs the host's local
accelerator) of one user, enrolled with a console that tells them of each other and gives them the user's
peer secret. The first pulls a big image from the upstream behind a slow link; the other three pull it next,
at once, and get their bytes from the peers: the upstream serves the image once for the four pulls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.services import images
from tests.services.console import Console
from tests.services.dockerd import Dockerd
from tests.services.mirror import DAO, FaultProxy
from tests.services.netns import NetHost
from tests.services.procs import Process, http_status, wait_until
from tests.services.upstream import PrivateRegistry

LAYERS = 4
LAYER_MIB = int(os.environ.get("DAO_TEST_PEER_MIB", "400")) // LAYERS
RATE = 600_000  # bytes/s of each upstream connection through the slow link (at most 24 per blob)
PEER_PORT = 5001
REF = "dao-test/peers:v1"
FIRST_HOST = 41


@dataclass
class Host:
    net: NetHost
    engine: Dockerd
    accelerator: Process  # the agent that runs it


def _accelerator_pid(data_dir: Path) -> int | None:
    """The local accelerator the test's agent started for this host (found by its own data directory)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--local" in argv and f"--data-dir={data_dir}".encode() in argv:
                return int(proc.name)
    return None


@pytest.fixture
def forwarding(isolated: None) -> Iterator[None]:
    """The test's namespace routes between the hosts (each host's link ends here)."""
    knob = Path("/proc/sys/net/ipv4/ip_forward")
    before = knob.read_text()
    knob.write_text("1\n")
    yield
    knob.write_text(before)


def test_four_hosts_pull_a_big_image_from_the_upstream_once(tmp_path: Path, forwarding: None) -> None:
    layers_dir = tmp_path / "layers"
    layers_dir.mkdir()
    layers = [images.data_layer(layers_dir, f"peer{i}", LAYER_MIB * 1024 * 1024) for i in range(LAYERS)]
    image = images.image(layers_dir, layers)
    image_bytes = sum(p.stat().st_size for p in image.blobs.values())
    registry = PrivateRegistry(tmp_path / "registry", "alice", "alice's hub password")  # the user's account
    registry.push("dao-test/peers", "v1", image)
    link = FaultProxy(tmp_path, registry.url, "--rate", str(RATE), host="0.0.0.0")
    indices = range(FIRST_HOST, FIRST_HOST + 4)
    hosts: list[Host] = []
    console = Console(tmp_path, users=("alice",), listen="0.0.0.0")
    try:
        for i in indices:
            net = NetHost(i, open_ports=(PEER_PORT,))
            subprocess.run(net.run("ip", "route", "add", "10.213.0.0/16", "via", net.outside), check=True)
            work = tmp_path / f"host{i}"
            work.mkdir()
            engine = Dockerd(work, ["http://127.0.0.1:5000"], prefix=net.run())
            config = work / "agent.toml"
            enrolled = subprocess.run(
                net.run(DAO, "agent", "enroll", "--console", f"http://{net.outside}:{console.port}",
                        "--token", console.token("alice"), "--config", str(config), "--name", f"host{i}"),
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert enrolled.returncode == 0, enrolled.stderr
            argv = [DAO, "agent", "run", "--config", str(config), "--interval", "1", "--local-accelerator",
                    "--peer-port", str(PEER_PORT), f"--accelerator-arg=--data-dir={work / 'data'}",
                    f"--accelerator-arg=--upstream=http://{net.outside}:{link.port}",
                    "--accelerator-arg=--upstream-username=alice"]  # fmt: skip
            env = {"DAO_MIRROR_UPSTREAM_PASSWORD": registry.password}
            agent = Process(net.run(*argv), work / "agent.log", env=env)
            hosts.append(Host(net, engine, agent))
            url = f"http://{net.inside}:{PEER_PORT}/healthz"
            wait_until(lambda url=url: http_status(url) == 200, 30, "local accelerator", agent.proc)
        wanted = {f"http://10.213.{j}.2:{PEER_PORT}" for j in indices}
        for host, i in zip(hosts, indices, strict=True):  # the console told each of the other three
            peers_file = tmp_path / f"host{i}" / "peers.json"
            others = wanted - {f"http://10.213.{i}.2:{PEER_PORT}"}
            wait_until(lambda f=peers_file, o=others: f.exists() and set(json.loads(f.read_text())) == o, 30,
                       "the console's peers", host.accelerator.proc)  # fmt: skip

        def pull(host: Host, times: dict[int, float]) -> None:
            started = time.monotonic()
            host.engine.docker("pull", REF)
            times[hosts.index(host)] = time.monotonic() - started

        times: dict[int, float] = {}
        pull(hosts[0], times)
        first_bytes = link.blob_bytes()
        threads = [threading.Thread(target=pull, args=(h, times)) for h in hosts[1:]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert sorted(times) == [0, 1, 2, 3], times
        upstream = link.blob_bytes()
        for host in hosts:
            digests = host.engine.docker("image", "inspect", "-f", "{{json .RepoDigests}}", REF).stdout
            assert json.loads(digests) == [f"dao-test/peers@{image.digest}"]
        print(
            f"\npeers: first pull {times[0]:.1f} s from the upstream; the next three at once "
            f"{times[1]:.1f} / {times[2]:.1f} / {times[3]:.1f} s; the upstream sent {upstream / 1e6:.1f} MB "
            f"({upstream / image_bytes:.2f}x the {image_bytes / 1e6:.1f} MB image) for the four pulls"
        )
        assert first_bytes >= image_bytes  # the first pull had to cross the slow link
        assert upstream <= image_bytes * 1.02  # the other three came from the peers
        # The agent starts its accelerator again when it dies.
        last = hosts[-1]
        child = _accelerator_pid(tmp_path / f"host{indices[-1]}" / "data")
        os.kill(child, signal.SIGKILL)
        url = f"http://{last.net.inside}:{PEER_PORT}/healthz"
        wait_until(lambda: _accelerator_pid(tmp_path / f"host{indices[-1]}" / "data") not in (None, child), 20,
                   "the accelerator started again", last.accelerator.proc)  # fmt: skip
        wait_until(lambda: http_status(url) == 200, 20, "the accelerator answering again", last.accelerator.proc)
    finally:
        for host in hosts:
            host.accelerator.stop()
            host.engine.stop()
            host.net.close()
        console.stop()
        link.stop()
        registry.stop()

"""Peers: four hosts (network namespaces, each with its own dockerd and local accelerator) of one user. The
first pulls a big image from the upstream behind a slow link; the other three pull it next, at once, and get
their bytes from the peers: the upstream serves the image once for the four pulls together."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.services import images
from tests.services.dockerd import Dockerd
from tests.services.mirror import DAO, FaultProxy
from tests.services.netns import NetHost
from tests.services.procs import Process, http_status, wait_until
from tests.services.upstream import PrivateRegistry

SECRET = "the peers of one user share this"
LAYERS = 4
LAYER_MIB = int(os.environ.get("DAO_TEST_PEER_MIB", "400")) // LAYERS
RATE = 300_000  # bytes/s of each upstream connection through the slow link (at most 24 per blob)
PEER_PORT = 5001
REF = "dao-test/peers:v1"
FIRST_HOST = 41


@dataclass
class Host:
    net: NetHost
    engine: Dockerd
    accelerator: Process


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
    try:
        for i in indices:
            net = NetHost(i, open_ports=(PEER_PORT,))
            subprocess.run(net.run("ip", "route", "add", "10.213.0.0/16", "via", net.outside), check=True)
            work = tmp_path / f"host{i}"
            work.mkdir()
            engine = Dockerd(work, ["http://127.0.0.1:5000"], prefix=net.run())
            peers = [a for j in indices if j != i for a in ("--peer", f"http://10.213.{j}.2:{PEER_PORT}")]
            argv = [DAO, "mirror", "serve", "--local", "--listen", "127.0.0.1:5000", "--data-dir", str(work / "data"),
                    "--upstream", f"http://{net.outside}:{link.port}", "--peer-listen", f"{net.inside}:{PEER_PORT}",
                    "--upstream-username", "alice", *peers]  # fmt: skip
            env = {"DAO_MIRROR_PEER_SECRET": SECRET, "DAO_MIRROR_UPSTREAM_PASSWORD": registry.password}
            accelerator = Process(net.run(*argv), work / "local.log", env=env)
            hosts.append(Host(net, engine, accelerator))
            url = f"http://{net.inside}:{PEER_PORT}/healthz"
            wait_until(lambda url=url: http_status(url) == 200, 20, "local accelerator", accelerator.proc)

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
    finally:
        for host in hosts:
            host.accelerator.stop()
            host.engine.stop()
            host.net.close()
        link.stop()
        registry.stop()

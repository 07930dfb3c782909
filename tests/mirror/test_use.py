"""``dao mirror use``: the file changes it plans and undoes, and a real dockerd that, after it, pulls through
the mirror without a restart."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dao.mirror import use
from tests.conftest import World
from tests.services.dockerd import Dockerd
from tests.services.mirror import DAO, Mirror


def dao_use(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DAO, "mirror", "use", *args], capture_output=True, text=True, timeout=60)


def test_files_are_merged_backed_up_and_restored(tmp_path: Path) -> None:
    daemon = tmp_path / "docker" / "daemon.json"
    daemon.parent.mkdir()
    daemon.write_text('{"debug": true, "registry-mirrors": ["https://other.example"]}')
    hosts = tmp_path / "certs.d" / "ghcr.io" / "hosts.toml"
    hosts.parent.mkdir(parents=True)
    hosts.write_text('server = "https://ghcr.io"\n# the user\'s own\n')
    conf = tmp_path / "containers" / "registries.conf"
    conf.parent.mkdir()
    conf.write_text('unqualified-search-registries = ["docker.io"]\n')
    paths = [
        "--docker-config", str(daemon), "--docker-pidfile", str(tmp_path / "no.pid"),
        "--containerd-certs", str(tmp_path / "certs.d"), "--registries-conf", str(conf),
        "--only", "docker", "--only", "containerd", "--only", "podman",
        "--registry", "docker.io", "--registry", "ghcr.io",
    ]  # fmt: skip
    originals = {p: p.read_text() for p in (daemon, hosts, conf)}

    dry = dao_use("http://10.0.0.5:5000", "--dry-run", *paths)
    assert dry.returncode == 0, dry.stderr
    assert '+    "http://10.0.0.5:5000",' in dry.stdout and '+location = "10.0.0.5:5000"' in dry.stdout
    assert {p: p.read_text() for p in originals} == originals  # a dry run writes nothing

    done = dao_use("http://10.0.0.5:5000", *paths)
    assert done.returncode == 0, done.stderr
    doc = json.loads(daemon.read_text())
    assert doc == {"debug": True, "registry-mirrors": ["http://10.0.0.5:5000", "https://other.example"]}
    assert daemon.with_name("daemon.json.dao-backup").read_text() == originals[daemon]
    assert 'host."http://10.0.0.5:5000"' in hosts.read_text()
    assert hosts.with_name("hosts.toml.dao-backup").read_text() == originals[hosts]
    hub = tmp_path / "certs.d" / "docker.io" / "hosts.toml"
    assert 'server = "https://registry-1.docker.io"' in hub.read_text()
    assert conf.read_text().startswith(originals[conf]) and use.BEGIN in conf.read_text()
    again = dao_use("http://10.0.0.5:5000", *paths)  # idempotent: no second mirror entry, no second block
    assert again.returncode == 0
    assert json.loads(daemon.read_text())["registry-mirrors"].count("http://10.0.0.5:5000") == 1
    assert conf.read_text().count(use.BEGIN) == 1

    undone = dao_use("--off", "http://10.0.0.5:5000", *paths)
    assert undone.returncode == 0, undone.stderr
    assert json.loads(daemon.read_text()) == json.loads(originals[daemon])
    assert hosts.read_text() == originals[hosts]  # the user's file is back
    assert not hub.exists()  # ours is gone
    assert conf.read_text() == originals[conf]


def test_a_docker_io_block_of_the_users_is_left_alone(tmp_path: Path) -> None:
    conf = tmp_path / "registries.conf"
    conf.write_text('[[registry]]\nprefix = "docker.io"\nlocation = "mirror.corp"\n')
    change = use.registries_conf_change(conf, "http://10.0.0.5:5000", off=False)
    assert change is not None and not change.changes and "already has a docker.io block" in change.note
    bad = tmp_path / "daemon.json"
    bad.write_text("{not json")
    with pytest.raises(use.UseError, match="not valid JSON"):
        use.docker_change(bad, "http://10.0.0.5:5000", off=False)
    assert dao_use("ftp://x", "--only", "docker", "--docker-config", str(bad)).returncode == 1


@pytest.fixture(scope="module")
def plain_dockerd(tmp_path_factory: pytest.TempPathFactory, isolated: None) -> Iterator[Dockerd]:
    engine = Dockerd(tmp_path_factory.mktemp("plain-dockerd"), [])  # no mirror configured
    try:
        yield engine
    finally:
        engine.stop()


def mirrors_of(engine: Dockerd) -> list[str]:
    out = engine.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}").stdout
    return [m.rstrip("/") for m in json.loads(out) or []]


def test_docker_pulls_through_the_mirror_after_use(world: World, plain_dockerd: Dockerd, tmp_path: Path) -> None:
    mirror = Mirror(tmp_path / "mirror", world.upstream.url)
    paths = ["--only", "docker", "--docker-config", str(plain_dockerd.config)]
    paths += ["--docker-pidfile", str(plain_dockerd.pidfile)]
    try:
        assert mirrors_of(plain_dockerd) == []
        done = dao_use(mirror.url, *paths)
        assert done.returncode == 0, done.stderr
        assert "reloaded" in done.stdout
        deadline = time.monotonic() + 15
        while mirrors_of(plain_dockerd) != [mirror.url] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mirrors_of(plain_dockerd) == [mirror.url]  # live, without a restart
        plain_dockerd.docker("pull", "dao-test/schema2:v1")
        served = {a.path for a in mirror.accesses() if a.status == 200}
        assert any(p.endswith("/dao-test/schema2/manifests/v1") for p in served)
        image = world.image("dao-test/schema2:v1")
        assert all(any(p.endswith(d) for p in served) for d in image.layer_digests())

        undone = dao_use("--off", mirror.url, *paths)
        assert undone.returncode == 0, undone.stderr
        deadline = time.monotonic() + 15
        while mirrors_of(plain_dockerd) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mirrors_of(plain_dockerd) == []
    finally:
        plain_dockerd.reset()
        mirror.stop()


def test_use_local_puts_the_local_accelerator_first_for_docker_and_every_registry_for_containerd(
    tmp_path: Path,
) -> None:
    daemon = tmp_path / "daemon.json"
    daemon.write_text(json.dumps({"registry-mirrors": ["http://127.0.0.1:1"], "debug": True}))
    certs = tmp_path / "certs.d"
    certs.mkdir()
    port = "5999"
    done = subprocess.run(
        [DAO, "mirror", "use", "--local", "--only", "docker", "--only", "containerd", "--docker-config", str(daemon),
         "--docker-pidfile", str(tmp_path / "none.pid"), "--containerd-certs", str(certs)],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "DAO_MIRROR_LISTEN": f"127.0.0.1:{port}"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "no local accelerator answers at http://127.0.0.1:5999" in done.stderr  # configured, not running yet
    written = json.loads(daemon.read_text())
    assert written["registry-mirrors"] == [f"http://127.0.0.1:{port}", "http://127.0.0.1:1"]
    assert written["debug"] is True
    for registry in ("docker.io", "ghcr.io", "quay.io"):
        assert f'[host."http://127.0.0.1:{port}"]' in (certs / registry / "hosts.toml").read_text()


def test_docker_pulls_through_the_local_accelerator_after_use_local(
    world: World, plain_dockerd: Dockerd, tmp_path: Path
) -> None:
    local = Mirror(tmp_path / "local", world.upstream.url, args=("--local",))
    paths = ["--only", "docker", "--docker-config", str(plain_dockerd.config)]
    paths += ["--docker-pidfile", str(plain_dockerd.pidfile)]
    env = {"PATH": "/usr/bin:/bin", "DAO_MIRROR_LISTEN": f"127.0.0.1:{local.port}", "HOME": str(tmp_path)}
    try:
        done = subprocess.run(
            [DAO, "mirror", "use", "--local", *paths], capture_output=True, text=True, timeout=60, env=env
        )
        assert done.returncode == 0, done.stderr
        assert "no local accelerator" not in done.stderr
        deadline = time.monotonic() + 15
        while mirrors_of(plain_dockerd) != [local.url] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mirrors_of(plain_dockerd) == [local.url]
        ref = "dao-test/oci:v1"
        plain_dockerd.docker("pull", ref)
        image = world.image(ref)
        served = {a.path.rsplit("/", 1)[1] for a in local.accesses() if "/blobs/" in a.path and a.status == 200}
        assert set(image.layer_digests()) <= served
        digests = json.loads(plain_dockerd.docker("image", "inspect", "-f", "{{json .RepoDigests}}", ref).stdout)
        assert digests == [f"dao-test/oci@{image.digest}"]
        undone = subprocess.run([DAO, "mirror", "use", "--off", "--local", *paths], capture_output=True, text=True,
                                timeout=60, env=env)  # fmt: skip
        assert undone.returncode == 0, undone.stderr
    finally:
        plain_dockerd.reset()
        local.stop()

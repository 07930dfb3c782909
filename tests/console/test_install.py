"""The real ``install.sh``, fetched from a real console and run as its one-line command says, under
``DAO_PREFIX`` (no root paths touched, no service installed). pip installs the console's dao wheel and its
dependencies from a local wheelhouse in place of the package index: the test's namespace has no network."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.services import wheelhouse
from tests.services.console import Client, Console
from tests.services.procs import Process, wait_until


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return wheelhouse.build(tmp_path_factory.mktemp("wheelhouse"))


def install(console: Console, token: str, prefix: Path, wheels: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(prefix.parent),
        "DAO_PREFIX": str(prefix),
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheels),
    }
    command = f"curl -fsSL {console.url}/install.sh | sh -s -- {token}"  # the console's command, less sudo
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=env, timeout=300, check=False)


async def _issue_address(console: Console) -> str:
    async with Client(console.url) as alice:
        await alice.login("alice")
        return (await alice.json("POST", "/api/accelerator/address"))["address"]


def test_install_sh_enrols_a_host_and_a_rerun_keeps_its_identity(tmp_path: Path, wheels: Path) -> None:
    console = Console(tmp_path, users=("alice",), args=("--accelerator-url", "http://mirror.test:5000"))
    prefix = tmp_path / "host"
    daemon_json = prefix / "etc/docker/daemon.json"  # a host with Docker, and a setting of its own
    daemon_json.parent.mkdir(parents=True)
    daemon_json.write_text('{"log-level": "warn"}')
    agent = None
    try:
        address = asyncio.run(_issue_address(console))
        done = install(console, console.token("alice"), prefix, wheels)
        assert done.returncode == 0, done.stdout + done.stderr
        docker = json.loads(daemon_json.read_text())  # pointed at alice's accelerator, its own setting kept
        assert docker == {"log-level": "warn", "registry-mirrors": [address]}, docker
        config = prefix / "etc/dao/agent.toml"
        assert oct(config.stat().st_mode & 0o777) == "0o600"
        dao = prefix / "usr/local/bin/dao"
        assert dao.is_symlink() and os.readlink(dao) == str(prefix / "opt/dao/bin/dao")
        version = subprocess.run([str(dao), "--version"], capture_output=True, text=True, check=True).stdout
        assert done.stdout.rstrip().endswith(version.strip()) and "no systemd here" in done.stdout
        [host] = console.hosts()
        assert host["user"] == "alice"
        identity = config.read_text()

        again = install(console, "daoenroll_spent", prefix, wheels)  # an upgrade: the token is not even asked for
        assert again.returncode == 0, again.stdout + again.stderr
        assert "keeping its identity" in again.stdout and config.read_text() == identity
        assert len(console.hosts()) == 1

        env = {"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock", "PATH": "/usr/bin:/bin"}
        agent = Process(
            [str(dao), "agent", "run", "--config", str(config), "--interval", "0.3"], tmp_path / "a.log", env
        )
        wait_until(lambda: console.hosts()[0]["online"], 30, "the installed agent online", agent.proc)
    finally:
        if agent is not None:
            agent.stop()
        console.stop()


def test_install_sh_with_a_bad_token_says_so(tmp_path: Path, wheels: Path) -> None:
    console = Console(tmp_path, users=("alice",))
    try:
        refused = install(console, "daoenroll_wrong", tmp_path / "host", wheels)
    finally:
        console.stop()
    assert refused.returncode == 1 and "enrolment refused" in refused.stderr
    assert not (tmp_path / "host/etc/dao/agent.toml").exists()

"""A real console and a real agent (separate processes, the real CLI): enrolment, the channel, metrics,
online and offline, and what a hostile or revoked peer gets."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.services.connect_proxy import ConnectProxy
from tests.services.console import PING, Console, dao
from tests.services.mirror import DAO
from tests.services.postgres import Postgres
from tests.services.procs import Process, wait_until
from tests.services.upstream import self_signed


@pytest.fixture
def console(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    c = Console(tmp_path)
    try:
        yield c.url, c.data
    finally:
        c.stop()


def hosts(data: Path, *args: str) -> list[dict]:
    done = dao("console", "hosts", "--json", "--data-dir", str(data), *args, data=data)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def enroll(url: str, data: Path, user: str, config: Path) -> subprocess.CompletedProcess[str]:
    token = dao("console", "enroll-token", user, "--data-dir", str(data), data=data)
    assert token.returncode == 0, token.stderr
    return dao("agent", "enroll", "--console", url, "--token", token.stdout.strip(), "--config", str(config), data=data)


def test_an_enrolled_agent_is_online_with_metrics_and_offline_when_gone(console, tmp_path: Path) -> None:
    url, data = console
    config = tmp_path / "agent" / "agent.toml"
    done = enroll(url, data, "alice", config)
    assert done.returncode == 0, done.stderr
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    assert "credential" in config.read_text()
    [host] = hosts(data)
    assert (host["user"], host["online"], host["metrics"]) == ("alice", False, None)

    env = {"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    agent = Process([DAO, "agent", "run", "--config", str(config), "--interval", "0.3"], tmp_path / "agent.log", env)
    try:
        wait_until(lambda: (h := hosts(data)[0])["online"] and h["metrics"] is not None, 30, "host online", agent.proc)
        [host] = hosts(data)
        assert host["facts"]["cpus"] == os.cpu_count() and host["version"]
        assert 0 <= host["metrics"]["cpu"] <= 100 and host["metrics"]["mem_total"] > 0
        assert hosts(data, "--user", "bob") == []  # bob sees none of alice's hosts
    finally:
        agent.kill()  # SIGKILL: no goodbye; the console must notice on its own
    wait_until(lambda: not hosts(data)[0]["online"], 3 * PING + 10, "host offline")
    assert "Traceback" not in agent.output()


def test_an_enrolment_token_works_once(console, tmp_path: Path) -> None:
    url, data = console
    token = dao("console", "enroll-token", "alice", "--data-dir", str(data), data=data).stdout.strip()
    first = dao("agent", "enroll", "--console", url, "--token", token, "--config", str(tmp_path / "a.toml"), data=data)
    assert first.returncode == 0, first.stderr
    again = dao("agent", "enroll", "--console", url, "--token", token, "--config", str(tmp_path / "b.toml"), data=data)
    assert again.returncode == 1 and "used already" in again.stderr and "Traceback" not in again.stderr
    wrong = dao("agent", "enroll", "--console", url, "--token", "nope", "--config", str(tmp_path / "c.toml"), data=data)
    assert wrong.returncode == 1 and "unknown enrolment token" in wrong.stderr
    assert not (tmp_path / "b.toml").exists() and not (tmp_path / "c.toml").exists()
    assert len(hosts(data)) == 1


async def test_hostile_peers_get_a_clean_refusal_and_the_console_goes_on(console, tmp_path: Path) -> None:
    url, data = console
    config = tmp_path / "agent.toml"
    assert enroll(url, data, "alice", config).returncode == 0
    credential = config.read_text().split('credential = "')[1].split('"')[0]
    channel = url.replace("http", "ws") + "/api/agent/channel"
    async with aiohttp.ClientSession() as s:
        for bad in ("Bearer daohost_guessed", "Basic x", ""):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await s.ws_connect(channel, headers={"Authorization": bad} if bad else {})
            assert info.value.status == 401
        auth = {"Authorization": f"Bearer {credential}"}
        for frame, code in [
            ('{"t": "metrics", "seq": 1, "samples": []}', 1002),  # not hello first
            ("not json", 1002),
        ]:
            async with s.ws_connect(channel, headers=auth) as ws:
                await ws.send_str(frame)
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == code
        async with s.ws_connect(channel, headers=auth) as ws:
            await ws.send_str('{"t": "hello", "version": "test"}')
            assert json.loads((await ws.receive(timeout=10)).data)["t"] == "welcome"
            await ws.send_str('{"t": "command", "id": "x", "op": "rm -rf /"}')  # a console frame, from an agent
            msg = await ws.receive(timeout=10)
            while msg.type == aiohttp.WSMsgType.TEXT:  # pings may come first
                msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1002
        async with s.ws_connect(channel, headers=auth) as ws:
            await ws.send_str('{"t": "hello", "version": "test"}')
            await ws.receive(timeout=10)
            await ws.send_str('{"t": "metrics", "seq": 3, "samples": [{"at": 1}, {"at": 2}, {"at": 3}]}')
            ack = json.loads((await ws.receive(timeout=10)).data)
            while ack["t"] == "ping":
                ack = json.loads((await ws.receive(timeout=10)).data)
            assert ack == {"t": "ack", "seq": 3}
            await ws.send_str('{"t": "metrics", "seq": 3, "samples": [{"at": 1}, {"at": 2}, {"at": 3}]}')  # again
            await asyncio.sleep(0.3)
    [host] = hosts(data)
    assert host["metrics"] == {"at": 3}  # stored once each: the latest is the third


def test_agents_come_back_after_a_console_restart_and_no_sample_is_lost(tmp_path: Path) -> None:
    console = Console(tmp_path)
    try:
        config = tmp_path / "agent.toml"
        assert enroll(console.url, console.data, "alice", config).returncode == 0
        env = {"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
        agent = Process(
            [DAO, "agent", "run", "--config", str(config), "--interval", "0.2"], tmp_path / "agent.log", env
        )
        try:
            wait_until(lambda: hosts(console.data)[0]["online"], 30, "host online", agent.proc)
            assert console.proc is not None
            console.proc.kill()  # SIGKILL: the channel breaks without a close frame
            wait_until(lambda: "dialling again" in agent.output(), 10, "the agent noticing")
            console.start()  # the samples taken meanwhile wait in the agent's outbox
            wait_until(lambda: hosts(console.data)[0]["online"], 40, "host online again", agent.proc)
            wait_until(lambda: len(_seqs(console.data)) >= 15, 20, "samples", agent.proc)
        finally:
            agent.stop()
        seqs = _seqs(console.data)
        assert seqs == list(range(1, len(seqs) + 1))  # every sample, once, none missing across the outage
        assert "Traceback" not in agent.output()
    finally:
        console.stop()


def _seqs(data: Path) -> list[int]:
    with sqlite3.connect(data / "dao.db") as db:
        return [row[0] for row in db.execute("SELECT seq FROM console_samples ORDER BY seq")]


def test_a_revoked_host_is_cut_off_and_its_agent_stops(console, tmp_path: Path) -> None:
    url, data = console
    config = tmp_path / "agent.toml"
    assert enroll(url, data, "alice", config).returncode == 0
    env = {"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    agent = Process([DAO, "agent", "run", "--config", str(config), "--interval", "0.3"], tmp_path / "agent.log", env)
    try:
        wait_until(lambda: hosts(data)[0]["online"], 30, "host online", agent.proc)
        [host] = hosts(data)
        revoked = dao("console", "revoke", host["id"], "--data-dir", str(data), data=data)
        assert revoked.returncode == 0, revoked.stderr
        agent.proc.wait(30)  # the channel closes within a ping; the next dial is refused: the agent ends
        assert agent.proc.returncode == 1
        assert "refuses this host's credential" in agent.output() and "Traceback" not in agent.output()
        assert hosts(data)[0]["online"] is False and hosts(data)[0]["revoked"] is True
    finally:
        agent.kill()
    missing = dao("console", "revoke", "nosuchhost", "--data-dir", str(data), data=data)
    assert missing.returncode == 1 and "no host" in missing.stderr


def test_over_https_through_a_proxy_the_agent_trusts_only_a_certificate_it_was_given(tmp_path: Path) -> None:
    key, cert = self_signed(tmp_path, "console", "127.0.0.1", ips=("127.0.0.1",))
    console = Console(tmp_path, users=("alice",), tls=(cert, key))
    config = tmp_path / "agent.toml"
    proxy = ConnectProxy()
    try:
        untrusted = console.enroll("alice", config)
        assert untrusted.returncode == 1 and "certificate" in untrusted.stderr.lower(), untrusted.stderr
        trusted = {"SSL_CERT_FILE": str(cert)}  # as a private CA is given to any OpenSSL client
        trusted |= {"HTTPS_PROXY": proxy.url, "NO_PROXY": "", "no_proxy": ""}  # the only way out of a firewall
        done = console.enroll("alice", config, env=trusted)
        assert done.returncode == 0, done.stderr
        env = {"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock", **trusted}
        agent = Process([DAO, "agent", "run", "--config", str(config), "--interval", "0.3"], tmp_path / "a.log", env)
        try:
            wait_until(lambda: console.hosts()[0]["online"], 30, "the host online over wss", agent.proc)
        finally:
            agent.stop()
    finally:
        console.stop()
        proxy.stop()
    target = f"127.0.0.1:{console.port}"
    assert proxy.tunnels.count(target) >= 2, proxy.tunnels  # the enrolment and the channel both went through it


def test_the_console_on_postgresql(tmp_path: Path) -> None:
    server = Postgres()
    console = None
    try:
        console = Console(tmp_path, users=("alice",), database=server.create_database("console"))
        config = tmp_path / "agent.toml"
        assert console.enroll("alice", config).returncode == 0
        env = {"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
        agent = Process([DAO, "agent", "run", "--config", str(config), "--interval", "0.2"], tmp_path / "a.log", env)
        try:
            wait_until(lambda: (h := console.hosts()[0])["online"] and h["metrics"], 30, "online", agent.proc)
        finally:
            agent.stop()
        assert not (console.data / "dao.db").exists()  # everything went to PostgreSQL
    finally:
        if console is not None:
            console.stop()
        server.stop()

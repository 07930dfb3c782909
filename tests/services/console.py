"""A real ``dao console serve`` (its own data dir and port, restartable on that port), the operator's
commands against it, agents enrolled to it, and a signed-in API client: what the console tests share."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from tests.services.mirror import DAO
from tests.services.procs import Process, free_port, wait_until

PING = 0.5  # the console's ping interval in these tests: offline after 3 missed, 1.5 s
PASSWORD = "correct horse battery"


def dao(
    *args: str, data: Path, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DOCKER_HOST": f"unix://{data}/no-engine.sock", **(env or {})}  # no engine here
    return subprocess.run([DAO, *args], capture_output=True, text=True, timeout=60, env=env, check=False, input=stdin)


class Console:
    def __init__(
        self,
        tmp_path: Path,
        users: tuple[str, ...] = ("alice", "bob"),
        ping: float = PING,
        tls: tuple[Path, Path] | None = None,
        args: tuple[str, ...] = (),
        listen: str = "127.0.0.1",
        database: str | None = None,
        port: int | None = None,
    ) -> None:
        """``listen``: the address it listens on (``0.0.0.0`` for hosts in namespaces of their own); the
        test itself always uses it at 127.0.0.1."""
        self.listen = listen
        self.database = ["--database", database] if database else []  # else SQLite in the data dir
        self.tls = tls
        self.args = args
        self.data = tmp_path / "console"
        self.data.mkdir()
        self.ping = ping
        for user in users:  # accounts with passwords, on accelerator users of the same ID
            added = self.dao("mirror", "users", "add", user, "--id", user)
            assert added.returncode == 0, added.stderr
            account = self.dao("console", "users", "add", user, "--password-stdin", stdin=PASSWORD + "\n")
            assert account.returncode == 0, account.stderr
        self.port = port or free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.log = tmp_path / "console.log"
        self.proc: Process | None = None
        self.start()

    def dao(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return dao(*args, "--data-dir", str(self.data), *self.database, data=self.data, stdin=stdin)

    def start(self) -> None:
        argv = [DAO, "console", "serve", "--listen", f"{self.listen}:{self.port}", "--data-dir", str(self.data)]
        if self.tls:
            argv += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        argv += [*self.args, *self.database]
        self.proc = Process([*argv, "--ping-interval", str(self.ping)], self.log)
        wait_until(lambda: _answers(f"{self.url}/api/agent/enroll", self.tls), 20, "console", self.proc.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def hosts(self, *args: str) -> list[dict[str, Any]]:
        done = self.dao("console", "hosts", "--json", *args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def token(self, user: str) -> str:
        done = self.dao("console", "enroll-token", user)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def enroll(
        self, user: str, config: Path, env: dict[str, str] | None = None, name: str | None = None, via: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """``via``: the console's URL as the agent knows it (a balancer in front), if not its own."""
        named = ("--name", name) if name else ()
        return dao(
            "agent",
            "enroll",
            "--console",
            via or self.url,
            "--token",
            self.token(user),
            "--config",
            str(config),
            *named,
            data=self.data,
            env=env,
        )


def _answers(url: str, tls: tuple[Path, Path] | None = None) -> bool:
    """Any HTTP answer (the empty enrolment is a 400); a refused connection raises, and wait_until waits."""
    context = ssl.create_default_context(cafile=str(tls[0])) if tls else None
    with contextlib.suppress(urllib.error.HTTPError):
        urllib.request.urlopen(urllib.request.Request(url, data=b"{}", method="POST"), timeout=2, context=context)
    return True


def agent(
    config: Path,
    log: Path,
    docker_host: str,
    interval: float = 0.3,
    cache: Path | None = None,
    args: tuple[str, ...] = (),
) -> Process:
    """``dao agent run`` for the engine at ``docker_host``; ``cache``: where its dao pull keeps blobs. App
    replicas go on the network ``none``: the test engines have no bridge."""
    env = {"DOCKER_HOST": docker_host, **({"XDG_CACHE_HOME": str(cache)} if cache else {})}
    argv = [DAO, "agent", "run", "--config", str(config), "--interval", str(interval), "--app-network", "none"]
    return Process([*argv, *args], log, env)


class Client:
    """A signed-in user of the console's JSON API, as a script would be: a session cookie and its CSRF token."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # cookies of 127.0.0.1
        self.csrf = ""

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def login(self, name: str, password: str = PASSWORD) -> Client:
        self.csrf = (await self.json("GET", "/api/me"))["csrf"]  # anonymous: the double-submit token
        await self.json("POST", "/api/login", {"name": name, "password": password})
        self.csrf = (await self.json("GET", "/api/me"))["csrf"]  # the session's own
        return self

    async def call(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        headers = {"X-CSRF-Token": self.csrf, **kw.pop("headers", {})}
        async with self.session.request(method, self.url + path, json=body, headers=headers, **kw) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text) if text else None
            except ValueError:
                return resp.status, text

    async def json(self, method: str, path: str, body: Any = None) -> Any:
        status, doc = await self.call(method, path, body)
        assert status < 400, (method, path, status, doc)
        return doc

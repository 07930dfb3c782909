"""The capsule provider, ``dao capsule serve`` (``docs/hosts.md``): it lends a machine's spare capacity as
short-lived Docker hosts. It is an agent whose channel runs the capsule operations only, so it reaches the
console outbound like any agent, and the console asks it for a capsule over that channel.

A capsule is a host of its own on this machine: a network namespace (one veth pair to this machine, a /30 of
``--subnet``, the default route through it), a dockerd in it with its own data root, exec root and socket,
and a dao agent in it that enrols with the one-time token the console sent, so it is the user's host like
any other. It lives ``--ttl``; then everything of it goes: the agent, every container, the dockerd, its
data, the namespace. A provider that starts again finds the capsules its last run left and ends them: a
capsule never outlives the provider that watches its clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dao.agent.operations import Emit, OperationError
from dao.agent.run import Identity
from dao.engine import Engine, EngineError

log = logging.getLogger("dao.capsule")

_ID = re.compile(r"[0-9a-f]{12}")
_TOKEN = re.compile(r"daoenroll_[A-Za-z0-9_-]{10,100}")
START_WITHIN = 90.0  # seconds for the capsule's dockerd to answer
STOP_WITHIN = 30.0  # seconds a capsule's process has after SIGTERM before SIGKILL


@dataclass
class Capsule:
    id: str
    slot: int
    netns: str
    veth: str
    dir: str
    exec_root: str
    host: str = ""
    created_at: float = 0.0
    expires_at: float = 0.0
    pids: tuple[int, ...] = ()  # dockerd's and the agent's, to end them after a provider restart

    @property
    def socket(self) -> str:
        return f"unix://{self.exec_root}/docker.sock"


class Provider:
    def __init__(
        self,
        state_dir: Path,
        *,
        ttl: float = 7200.0,
        most: int = 4,
        subnet: str = "10.215",
        nat: bool = True,
        console_url: str = "",
        dockerd_args: tuple[str, ...] = (),
        agent_args: tuple[str, ...] = (),
    ) -> None:
        """``subnet``: the first two octets of the capsules' addresses (capsule in slot n: n.0/30 of it);
        ``console_url``: the console as a capsule reaches it, ``{gateway}`` standing for this machine's end
        of the capsule's link (default: the URL the console sent)."""
        self.state_dir, self.ttl, self.most, self.subnet, self.nat = state_dir, ttl, most, subnet, nat
        self.console_url, self.dockerd_args, self.agent_args = console_url, dockerd_args, agent_args
        self.capsules: dict[str, Capsule] = {}
        self._procs: dict[str, list[asyncio.subprocess.Process]] = {}
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    # -- what the agent says and runs ----------------------------------------------------------------------

    def facts(self) -> dict[str, object]:
        return {"provider": {"max": self.most, "running": len(self.capsules), "ttl": self.ttl}}

    @property
    def operations(self) -> dict[str, Any]:
        return {"capsule.create": self.create, "capsule.destroy": self.destroy_op, "capsule.list": self.list_op}

    async def list_op(self, args: dict[str, Any], emit: Emit) -> Any:
        return [asdict(c) for c in self.capsules.values()]

    async def destroy_op(self, args: dict[str, Any], emit: Emit) -> Any:
        capsule = self.capsules.get(str(args.get("capsule")))
        if capsule is None:
            raise OperationError("no such capsule here")
        await self.destroy(capsule)
        return {"destroyed": capsule.id}

    async def create(self, args: dict[str, Any], emit: Emit) -> Any:
        capsule_id, token = args.get("capsule"), args.get("token")
        if not isinstance(capsule_id, str) or not _ID.fullmatch(capsule_id):
            raise OperationError("args.capsule: the capsule's ID (12 hex digits)")
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            raise OperationError("args.token: a one-time enrolment token")
        async with self._lock:
            if len(self.capsules) >= self.most:
                raise OperationError(f"this provider runs {self.most} capsule(s) already: that is its most")
            if capsule_id in self.capsules:
                raise OperationError("that capsule exists")
            used = {c.slot for c in self.capsules.values()}
            slot = next(n for n in range(1, 251) if n not in used)
            home = self.state_dir / "capsules" / capsule_id
            capsule = Capsule(
                capsule_id,
                slot,
                f"dao-cap-{capsule_id}",
                f"dcap{capsule_id[:8]}",
                str(home),
                tempfile.mkdtemp(prefix=f"dao-cap-{capsule_id[:6]}-", dir="/tmp"),  # short: a socket lives here
            )
            self.capsules[capsule_id] = capsule
            self._save()
        try:
            await self._build(capsule, token, str(args.get("console") or ""))
        except BaseException as exc:
            log.warning("capsule %s could not be made: %s", capsule_id, exc)
            await self.destroy(capsule)
            if isinstance(exc, OperationError | EngineError):
                raise OperationError(f"the capsule could not be made: {exc}") from None
            raise
        self._timers[capsule_id] = asyncio.get_running_loop().create_task(self._expire(capsule))
        return {
            "capsule": capsule_id,
            "host": capsule.host,
            "expires_at": capsule.expires_at,
            "address": self._ip(capsule, 2),
        }

    # -- a capsule's life ----------------------------------------------------------------------------------

    def _ip(self, capsule: Capsule, end: int) -> str:
        return f"{self.subnet}.{capsule.slot}.{end}"

    async def _build(self, capsule: Capsule, token: str, console: str) -> None:
        home = Path(capsule.dir)
        await asyncio.to_thread(home.mkdir, parents=True, exist_ok=True, mode=0o700)
        gateway, inside = self._ip(capsule, 1), self._ip(capsule, 2)
        await _run("ip", "netns", "add", capsule.netns)
        await _run("ip", "link", "add", capsule.veth, "type", "veth", "peer", "name", "eth0", "netns", capsule.netns)
        await _run("ip", "addr", "add", f"{gateway}/30", "dev", capsule.veth)
        await _run("ip", "link", "set", capsule.veth, "up")
        for argv in (
            ("ip", "link", "set", "lo", "up"),
            ("ip", "addr", "add", f"{inside}/30", "dev", "eth0"),
            ("ip", "link", "set", "eth0", "up"),
            ("ip", "route", "add", "default", "via", gateway),
        ):
            await _run(*self._inside(capsule, *argv))
        url = (self.console_url or console).replace("{gateway}", gateway)
        if not url:
            raise OperationError("no console URL for the capsule's agent (give dao capsule serve --capsule-console)")
        config = home / "agent.toml"
        await _run(
            *self._inside(capsule, *_dao(), "agent", "enroll", "--console", url, "--token", token),
            "--name", f"capsule-{capsule.id}", "--config", str(config),
            within=60,
        )  # fmt: skip
        identity = Identity.load(config)
        capsule.host = identity.host
        daemon = {"registry-mirrors": [identity.mirror]} if identity.mirror else {}
        (home / "daemon.json").write_text(json.dumps(daemon))
        dockerd = await self._spawn(
            capsule,
            "dockerd",
            [
                "dockerd",
                "--config-file", str(home / "daemon.json"),
                "--data-root", str(home / "data"),
                "--exec-root", f"{capsule.exec_root}/exec",
                "--pidfile", f"{capsule.exec_root}/docker.pid",
                "-H", capsule.socket,
                *self.dockerd_args,
            ],
        )  # fmt: skip
        deadline = time.monotonic() + START_WITHIN
        while True:
            with contextlib.suppress(EngineError):
                async with Engine(capsule.socket) as engine:
                    await engine.negotiate()
                    break
            if dockerd.returncode is not None or time.monotonic() > deadline:
                tail = (home / "dockerd.log").read_text(errors="replace")[-400:]
                raise OperationError(f"the capsule's dockerd did not start: {tail}")
            await asyncio.sleep(0.2)
        await self._spawn(
            capsule,
            "agent",
            [*_dao(), "agent", "run", "--config", str(config), *self.agent_args],
            env={**os.environ, "DOCKER_HOST": capsule.socket},
        )
        capsule.created_at = time.time()
        capsule.expires_at = capsule.created_at + self.ttl
        self._save()
        log.info(
            "capsule %s up: host %s at %s, until %s", capsule.id, capsule.host, inside, time.ctime(capsule.expires_at)
        )

    def _inside(self, capsule: Capsule, *argv: str) -> list[str]:
        # nsenter, not ip netns exec: that one mounts a /sys of its own, which hides the cgroups dockerd needs
        return ["nsenter", f"--net=/run/netns/{capsule.netns}", "--", *argv]

    async def _spawn(
        self, capsule: Capsule, what: str, argv: list[str], env: dict[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        with (Path(capsule.dir) / f"{what}.log").open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *self._inside(capsule, *argv), stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                start_new_session=True,
            )  # fmt: skip
        self._procs.setdefault(capsule.id, []).append(proc)
        capsule.pids = (*capsule.pids, proc.pid)
        self._save()
        return proc

    async def _expire(self, capsule: Capsule) -> None:
        await asyncio.sleep(max(capsule.expires_at - time.time(), 0))
        log.info("capsule %s expired", capsule.id)
        self._timers.pop(capsule.id, None)
        await self.destroy(capsule)

    async def destroy(self, capsule: Capsule) -> None:
        """Everything of it, in order: the agent (it reports no more), the containers, the dockerd, whatever
        else still runs in the namespace, the data, the namespace."""
        timer = self._timers.pop(capsule.id, None)
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()
        procs = self._procs.pop(capsule.id, [])
        for proc in procs[1:]:  # dockerd is first in the list, the agent after it
            await _end(proc.pid, proc)
        with contextlib.suppress(EngineError, TimeoutError):
            async with asyncio.timeout(60), Engine(capsule.socket) as engine:
                for c in await engine.containers(stopped=True):
                    with contextlib.suppress(EngineError):
                        await engine.remove_container(str(c["Id"]), force=True)
        for proc in procs[:1]:
            await _end(proc.pid, proc)
        for pid in capsule.pids:  # after a provider restart: the processes of its last run, if still theirs
            if _belongs(pid, capsule):
                await _end(pid, None)
        with contextlib.suppress(OperationError):
            for pid in (await _run("ip", "netns", "pids", capsule.netns)).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        await _run("ip", "netns", "del", capsule.netns, check=False)
        await _run("ip", "link", "del", capsule.veth, check=False)
        for path in (capsule.dir, capsule.exec_root):
            await asyncio.to_thread(_remove_tree, Path(path))
        self.capsules.pop(capsule.id, None)
        self._save()
        log.info("capsule %s destroyed", capsule.id)

    # -- the provider's own life ---------------------------------------------------------------------------

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        state = self.state_dir / "capsules.json"
        state.with_suffix(".tmp").write_text(json.dumps([asdict(c) for c in self.capsules.values()]))
        state.with_suffix(".tmp").replace(state)

    async def start(self) -> None:
        """End what the last run left (its clocks stopped with it), and let capsules out when asked to."""
        if os.geteuid() != 0:
            raise OperationError("a capsule provider makes network namespaces and runs dockerd: run it as root")
        try:
            left = json.loads((self.state_dir / "capsules.json").read_text())
        except (OSError, ValueError):
            left = []
        for doc in left:
            with contextlib.suppress(TypeError):
                capsule = Capsule(**{**doc, "pids": tuple(doc.get("pids") or ())})
                self.capsules[capsule.id] = capsule
                log.info("capsule %s was left by the last run: destroyed", capsule.id)
                await self.destroy(capsule)
        if self.nat:
            await _run("sysctl", "-qw", "net.ipv4.ip_forward=1")
            rules = (
                "table ip dao_capsules {\n chain out {\n  type nat hook postrouting priority 100; policy accept;\n"
                f'  ip saddr {self.subnet}.0.0/16 oifname != "dcap*" masquerade\n }}\n}}\n'
            )
            await _run("nft", "-f", "-", stdin=rules)

    async def stop(self) -> None:
        for capsule in list(self.capsules.values()):
            await self.destroy(capsule)
        if self.nat:
            await _run("nft", "delete", "table", "ip", "dao_capsules", check=False)


def _dao() -> list[str]:
    return [sys.executable, "-m", "dao"]


def _remove_tree(path: Path) -> None:
    """A capsule's directory, mounts and all: a mount dockerd left behind is lazily unmounted first."""
    if not path.exists():
        return
    with contextlib.suppress(OSError):
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(f"{path}/")), reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False, timeout=30)
    shutil.rmtree(path, ignore_errors=True)


def _belongs(pid: int, capsule: Capsule) -> bool:
    """A PID the last run recorded is still that capsule's process (not a new one that got the number)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return capsule.dir in cmdline or capsule.exec_root in cmdline


async def _end(pid: int, proc: asyncio.subprocess.Process | None) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WITHIN
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.returncode is not None:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.2)
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if proc is not None:
        await proc.wait()


async def _run(*argv: str, check: bool = True, stdin: str | None = None, within: float = 30) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else None), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise OperationError(f"{argv[0]} did not finish within {within:g} s") from None
    if check and proc.returncode != 0:
        words = " ".join(a for a in argv if not a.startswith("daoenroll_"))  # never a token in a message
        raise OperationError(f"{words[:120]}: {err.decode(errors='replace').strip()[-300:]}")
    return out.decode()

"""The named operations an agent runs for the console, and nothing else (``docs/agent.md``).

Each takes the command's ``args`` (checked here: they come off the network) and an ``emit`` for output that
streams (log lines, pull progress), and returns the result's data. Each acts on the agent's own engine only,
found as the docker CLI finds it; there is no shell and no operation that takes a path or a command line.
A refusal is an :class:`OperationError` whose message the console shows as it is.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

from dao.clean.plan import Options, Plan
from dao.clean.run import apply_plan, scan
from dao.engine import Engine, EngineError
from dao.errors import DaoError

Emit = Callable[[str], Awaitable[None]]
Operation = Callable[[dict[str, Any], Emit], Awaitable[Any]]

# A container's ID (or a prefix of one) or its name, as the engine accepts them; nothing with a slash or a
# query, so an argument cannot steer the engine call somewhere else.
_CONTAINER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_REFERENCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,511}")
LOG_TAIL_MAX = 10_000
LOG_FLUSH = 0.1  # seconds: log output is sent in pieces at most this old
LOG_PIECE = 32 * 1024  # bytes of output in one stream frame at most


class OperationError(DaoError):
    pass


def _container(args: dict[str, Any]) -> str:
    value = args.get("id")
    if not isinstance(value, str) or not _CONTAINER.fullmatch(value):
        raise OperationError("give the container's ID or name as args.id")
    return value


def _int(args: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise OperationError(f"args.{name} must be a whole number from {low} to {high}")
    return value


async def _on_engine(call: Callable[[Engine], Awaitable[Any]]) -> Any:
    try:
        async with Engine() as engine:
            return await call(engine)
    except EngineError as exc:
        raise OperationError(str(exc).split(": ", 2)[-1] if exc.status else str(exc)) from None


def _lifecycle(action: str) -> Operation:
    async def run(args: dict[str, Any], emit: Emit) -> Any:
        container = _container(args)

        async def call(engine: Engine) -> Any:
            if action == "start":
                await engine.start_container(container)
            elif action == "stop":
                await engine.stop_container(container, grace=_int(args, "grace", 10, 0, 600))
            elif action == "restart":
                await engine.restart_container(container, grace=_int(args, "grace", 10, 0, 600))
            else:
                await engine.remove_container(container, force=args.get("force") is True)
            return {"id": container, "done": action}

        return await _on_engine(call)

    return run


async def container_logs(args: dict[str, Any], emit: Emit) -> Any:
    """The last ``tail`` lines, then (``follow``) what the container writes, until it stops or the console
    cancels. Output goes out in pieces of at most about ``LOG_PIECE`` bytes and ``LOG_FLUSH`` seconds old;
    only this loop sends, so the pieces arrive in order."""
    container = _container(args)
    tail = _int(args, "tail", 100, 0, LOG_TAIL_MAX)
    follow = args.get("follow", False) is True
    pending: list[bytes] = []
    full = asyncio.Event()
    sent = 0

    async def call(engine: Engine) -> Any:
        nonlocal sent

        async def read() -> None:
            size = 0
            async for _, chunk in engine.logs(container, follow=follow, tail=tail):
                pending.append(chunk)
                size += len(chunk)
                if size >= LOG_PIECE:
                    size = 0
                    full.set()

        reader = asyncio.ensure_future(read())
        try:
            while True:
                woken = asyncio.ensure_future(full.wait())
                try:
                    await asyncio.wait({reader, woken}, timeout=LOG_FLUSH, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
                full.clear()
                if pending:
                    text = b"".join(pending).decode("utf-8", "replace")
                    pending.clear()
                    sent += len(text)
                    await emit(text)
                if reader.done():
                    reader.result()
                    return {"id": container, "characters": sent}
        finally:
            reader.cancel()

    return await _on_engine(call)


async def image_pull(args: dict[str, Any], emit: Emit) -> Any:
    """dao pull on this host, into its engine, through the mirrors it is configured with; each line of the
    pull's output is streamed as it is printed."""
    from dao.pull.run import PullOptions, pull

    ref = args.get("ref")
    if not isinstance(ref, str) or not _REFERENCE.fullmatch(ref):
        raise OperationError("give the image reference as args.ref (e.g. debian:12)")
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    async def forward() -> None:
        while (line := await lines.get()) is not None:
            await emit(line)

    forwarding = asyncio.ensure_future(forward())
    try:
        status = await pull(PullOptions(reference=ref), out=lambda line: lines.put_nowait(line + "\n"))
    except DaoError as exc:
        raise OperationError(exc.message) from None
    finally:
        lines.put_nowait(None)
        await forwarding
    return {"ref": ref, "status": status}


async def clean_plan(args: dict[str, Any], emit: Emit) -> Any:
    """``dao clean -d`` with the default rules (``args.grace``: seconds, as ``--grace``): the plan, as the
    JSON ``clean.apply`` takes back."""
    options = Options(grace=float(_int(args, "grace", int(Options.grace), 0, 10 * 365 * 86400)))

    async def call(engine: Engine) -> Any:
        _, plan = await scan(engine, options)
        return plan.to_json()

    return await _on_engine(call)


async def clean_apply(args: dict[str, Any], emit: Emit) -> Any:
    """Apply exactly the plan given (made by ``clean.plan`` on this host): what it lists and a fresh scan
    still finds garbage goes; nothing else does."""
    wanted = Plan.from_json(args.get("plan"), "args.plan")

    async def call(engine: Engine) -> Any:
        state, fresh = await scan(engine, wanted.options, made_for=wanted)
        return (await apply_plan(engine, wanted, state, fresh)).to_json()

    return await _on_engine(call)


_LABEL = re.compile(r"dao\.[a-z0-9_.-]{1,40}")
_VOLUME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
NETWORK = "bridge"  # where app containers go; dao agent run --app-network changes it


def _strings(value: Any, where: str, limit: int = 1000) -> list[str]:
    if not isinstance(value, list) or len(value) > limit or not all(isinstance(v, str) for v in value):
        raise OperationError(f"args.{where} must be a list of strings")
    return value


async def container_run(args: dict[str, Any], emit: Emit) -> Any:
    """Create and start one replica of an app's service: an image, its command and environment, published
    ports, named volumes (made if missing), a restart policy, a healthcheck, limits, and ``dao.*`` labels.
    No bind mounts, no privileges, no host namespaces: nothing an app may ask for reaches outside its
    container but its ports and its volumes. The image is pulled first (dao pull) when the policy says so."""
    name = args.get("name")
    image = args.get("image")
    if not isinstance(name, str) or not _CONTAINER.fullmatch(name):
        raise OperationError("args.name: a container name")
    if not isinstance(image, str) or not _REFERENCE.fullmatch(image):
        raise OperationError("args.image: an image reference")
    labels = args.get("labels") or {}
    if not isinstance(labels, dict) or not all(
        _LABEL.fullmatch(str(k)) and isinstance(v, str) for k, v in labels.items()
    ):
        raise OperationError("args.labels: dao.* labels only, of strings")
    command = args.get("command")
    env = _strings(args.get("env") or [], "env")
    mounts = []
    for m in args.get("mounts") or []:
        if (
            not isinstance(m, dict)
            or not _VOLUME.fullmatch(str(m.get("volume")))
            or not str(m.get("target")).startswith("/")
        ):
            raise OperationError("args.mounts: named volumes on absolute paths only")
        mounts.append(
            {"Type": "volume", "Source": m["volume"], "Target": m["target"], "ReadOnly": m.get("read_only") is True}
        )
    ports: dict[str, list[dict[str, str]]] = {}
    for p in args.get("ports") or []:
        if (
            not isinstance(p, dict)
            or not isinstance(p.get("container"), int)
            or p.get("protocol", "tcp") not in ("tcp", "udp")
        ):
            raise OperationError("args.ports: {container, host, protocol}")
        host_port = p.get("host")
        ports[f"{p['container']}/{p.get('protocol', 'tcp')}"] = [
            {"HostPort": str(host_port) if isinstance(host_port, int) else ""}
        ]
    restart = args.get("restart", "no")
    if restart not in ("no", "always", "on-failure", "unless-stopped"):
        raise OperationError("args.restart: no, always, on-failure or unless-stopped")
    config: dict[str, Any] = {
        "Image": image,
        "Env": env,
        "Labels": labels,
        "ExposedPorts": {key: {} for key in ports},
        "HostConfig": {
            "Mounts": mounts,
            "PortBindings": ports,
            "RestartPolicy": {"Name": restart},
            "NetworkMode": NETWORK,
            "NanoCpus": int(float(args.get("cpus_limit") or 0) * 1e9),
            "Memory": int(args.get("memory_limit") or 0),
        },
    }
    if isinstance(command, str):
        config["Cmd"] = ["/bin/sh", "-c", command]
    elif command is not None:
        config["Cmd"] = _strings(command, "command")
    check = args.get("healthcheck")
    if isinstance(check, dict):
        ns = 1_000_000_000
        config["Healthcheck"] = {
            "Test": _strings(check.get("test"), "healthcheck.test", 100),
            "Interval": int(float(check.get("interval", 30)) * ns),
            "Timeout": int(float(check.get("timeout", 30)) * ns),
            "Retries": int(check.get("retries", 3)),
            "StartPeriod": int(float(check.get("start_period", 0)) * ns),
        }
    policy = args.get("pull_policy", "missing")

    async def call(engine: Engine) -> Any:
        present = await engine.inspect_image(image) is not None
        if policy == "always" or (policy == "missing" and not present):
            await image_pull({"ref": image}, emit)
        elif not present:
            raise OperationError(f"{image} is not on this host and pull_policy is never")
        container = await engine.create_container(name, config)
        if args.get("start", True) is not False:  # (not yet: a moved replica gets its volumes' copy first)
            await engine.start_container(container)
        return {"id": container, "name": name}

    return await _on_engine(call)


OPERATIONS: dict[str, Operation] = {
    "container.run": container_run,
    "container.start": _lifecycle("start"),
    "container.stop": _lifecycle("stop"),
    "container.restart": _lifecycle("restart"),
    "container.remove": _lifecycle("remove"),
    "container.logs": container_logs,
    "image.pull": image_pull,
    "clean.plan": clean_plan,
    "clean.apply": clean_apply,
}

"""An app is a docker-compose file, the format users already write; this reads the part of it dao runs
(``docs/apps.md``) into plain data, and refuses everything else by name: a key dao would ignore is a key
whose meaning the user would lose without being told.

YAML is read with PyYAML's safe loader (no tags that build objects), from at most ``MAX_BYTES``, and its
node graph is walked with a budget first, so anchors that fan out (a "billion laughs") are refused before
anything is built from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from dao.errors import DaoError

MAX_BYTES = 256 * 1024
MAX_NODES = 50_000
MAX_REPLICAS = 100
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?")
_CONSTRAINT = re.compile(r"\s*node\.(labels\.([A-Za-z0-9._/-]+)|hostname|id)\s*(==|!=)\s*(\S+)\s*")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([bkmg]?)b?", re.IGNORECASE)

TOP_KEYS = {"services", "volumes", "name", "version"}
SERVICE_KEYS = {
    "image", "command", "environment", "ports", "volumes", "restart", "healthcheck", "deploy", "pull_policy",
}  # fmt: skip
DEPLOY_KEYS = {"replicas", "placement", "resources"}
RESTARTS = {"no", "always", "on-failure", "unless-stopped"}
PULL_POLICIES = {"always", "missing", "never"}


class ComposeError(DaoError):
    """The file is not one dao can run; the message names the key (``services.web.build``)."""


@dataclass(frozen=True, slots=True)
class Constraint:
    """``node.labels.region == eu``: ``key`` is ``labels.region``, ``hostname`` or ``id``."""

    key: str
    equal: bool
    value: str

    def holds(self, labels: dict[str, str], hostname: str, host_id: str) -> bool:
        if self.key.startswith("labels."):
            actual = labels.get(self.key[len("labels.") :])
        else:
            actual = hostname if self.key == "hostname" else host_id
        return (actual == self.value) is self.equal

    def __str__(self) -> str:
        return f"node.{self.key} {'==' if self.equal else '!='} {self.value}"


@dataclass(frozen=True, slots=True)
class Healthcheck:
    test: tuple[str, ...]  # ("CMD", ...) or ("CMD-SHELL", "...") or ("NONE",)
    interval: float = 30.0
    timeout: float = 30.0
    retries: int = 3
    start_period: float = 0.0


@dataclass(frozen=True, slots=True)
class Port:
    container: int
    host: int | None = None  # None: the engine picks one
    protocol: str = "tcp"


@dataclass(frozen=True, slots=True)
class Mount:
    volume: str
    target: str
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    image: str
    command: tuple[str, ...] | str | None = None
    environment: tuple[tuple[str, str], ...] = ()
    ports: tuple[Port, ...] = ()
    mounts: tuple[Mount, ...] = ()
    restart: str = "no"
    healthcheck: Healthcheck | None = None
    replicas: int = 1
    constraints: tuple[Constraint, ...] = ()
    cpus: float = 0.0  # reserved (deploy.resources.reservations), for placement
    memory: int = 0  # bytes reserved
    cpus_limit: float = 0.0
    memory_limit: int = 0
    pull_policy: str = "missing"


@dataclass(frozen=True, slots=True)
class App:
    services: dict[str, Service]
    volumes: tuple[str, ...] = field(default=())


def parse(text: str | bytes) -> App:
    if len(text) > MAX_BYTES:
        raise ComposeError(f"the compose file is over {MAX_BYTES // 1024} KiB")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        _budget(node)
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ComposeError(f"not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ComposeError("a compose file is a mapping with 'services'")
    doc = _literal(doc, "")
    _only(doc, TOP_KEYS, "")
    services = doc.get("services")
    if not isinstance(services, dict) or not services:
        raise ComposeError("services: give at least one service")
    declared = doc.get("volumes") or {}
    if not isinstance(declared, dict):
        raise ComposeError("volumes: a mapping of volume names")
    for name, spec in declared.items():
        _name(str(name), f"volumes.{name}")
        if spec not in (None, {}):
            raise ComposeError(f"volumes.{name}: options are not supported (dao makes plain local volumes)")
    parsed = {str(name): _service(str(name), spec, set(map(str, declared))) for name, spec in services.items()}
    return App(parsed, tuple(sorted(map(str, declared))))


_VARIABLE = re.compile(r"\$(\{[^}]*\}?|[A-Za-z_][A-Za-z0-9_]*)")


def _literal(value: Any, where: str) -> Any:
    """Compose's interpolation, as far as dao goes: ``$$`` is a literal ``$`` (so a shell command reads as
    it does under docker compose); a variable (``$NAME``, ``${NAME}``) is refused, never left as text."""
    if isinstance(value, str):
        found = _VARIABLE.search(value.replace("$$", ""))
        if found:
            raise ComposeError(
                f"{where.lstrip('.')}: variable interpolation ({found.group(0)}) is not supported; "
                "write the value itself, or $$ for a literal $"
            )
        return value.replace("$$", "$")
    if isinstance(value, dict):
        return {k: _literal(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_literal(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _budget(node: yaml.Node | None) -> None:
    """Count the nodes as the loader would build them, aliases followed each time, and stop at the cap."""
    seen = 0
    stack = [node] if node is not None else []
    while stack:
        current = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise ComposeError(f"the compose file expands to more than {MAX_NODES} values (anchors?)")
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                stack += (key, value)
        elif isinstance(current, yaml.SequenceNode):
            stack += current.value


def _only(doc: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in doc:
        if str(key) not in allowed and not str(key).startswith("x-"):
            raise ComposeError(f"{where}{key} is not supported by dao (it supports: {', '.join(sorted(allowed))})")


def _name(name: str, where: str) -> str:
    if not _NAME.fullmatch(name):
        raise ComposeError(f"{where}: a name is lower-case letters, digits, '_', '.', '-'")
    return name


def _service(name: str, spec: Any, volumes: set[str]) -> Service:
    where = f"services.{name}."
    _name(name, f"services.{name}")
    if not isinstance(spec, dict):
        raise ComposeError(f"services.{name}: a mapping")
    _only(spec, SERVICE_KEYS, where)
    image = spec.get("image")
    if not isinstance(image, str) or not image.strip():
        raise ComposeError(f"{where}image: every service needs an image (dao does not build)")
    restart = str(spec.get("restart", "no"))
    if restart not in RESTARTS:
        raise ComposeError(f"{where}restart: one of {', '.join(sorted(RESTARTS))}")
    pull = str(spec.get("pull_policy", "missing"))
    if pull not in PULL_POLICIES:
        raise ComposeError(f"{where}pull_policy: one of {', '.join(sorted(PULL_POLICIES))}")
    deploy = spec.get("deploy") or {}
    if not isinstance(deploy, dict):
        raise ComposeError(f"{where}deploy: a mapping")
    _only(deploy, DEPLOY_KEYS, f"{where}deploy.")
    replicas = deploy.get("replicas", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 0 <= replicas <= MAX_REPLICAS:
        raise ComposeError(f"{where}deploy.replicas: a whole number from 0 to {MAX_REPLICAS}")
    cpus, memory, cpus_limit, memory_limit = _resources(deploy.get("resources") or {}, f"{where}deploy.resources.")
    return Service(
        name=name,
        image=image.strip(),
        command=_command(spec.get("command"), f"{where}command"),
        environment=_environment(spec.get("environment"), f"{where}environment"),
        ports=tuple(_port(p, f"{where}ports[{i}]") for i, p in enumerate(_list(spec.get("ports"), f"{where}ports"))),
        mounts=tuple(
            _mount(v, volumes, f"{where}volumes[{i}]")
            for i, v in enumerate(_list(spec.get("volumes"), f"{where}volumes"))
        ),
        restart=restart,
        healthcheck=_healthcheck(spec.get("healthcheck"), f"{where}healthcheck"),
        replicas=replicas,
        constraints=_constraints(deploy.get("placement") or {}, f"{where}deploy.placement"),
        cpus=cpus,
        memory=memory,
        cpus_limit=cpus_limit,
        memory_limit=memory_limit,
        pull_policy=pull,
    )


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ComposeError(f"{where}: a list")
    return value


def _command(value: Any, where: str) -> tuple[str, ...] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return tuple(str(v) for v in value)
    raise ComposeError(f"{where}: a string or a list of strings")


def _environment(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    pairs: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            pairs.append((str(k), "" if v is None else str(v).lower() if isinstance(v, bool) else str(v)))
    elif isinstance(value, list):
        for item in value:
            key, sep, val = str(item).partition("=")
            if not sep:
                raise ComposeError(f"{where}: {item!r} takes its value from the deployer's shell, which dao has not")
            pairs.append((key, val))
    else:
        raise ComposeError(f"{where}: a mapping or a list of KEY=VALUE")
    for key, _ in pairs:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key):
            raise ComposeError(f"{where}: {key!r} is not a variable name")
    return tuple(pairs)


def _port(value: Any, where: str) -> Port:
    text = str(value)
    body, _, protocol = text.partition("/")
    protocol = protocol or "tcp"
    parts = body.split(":")
    if protocol not in ("tcp", "udp") or len(parts) > 2 or not all(p.isdigit() for p in parts):
        raise ComposeError(f"{where}: HOST:CONTAINER or CONTAINER, optionally /udp (no address, no ranges)")
    numbers = [int(p) for p in parts]
    if not all(0 < n < 65536 for n in numbers):
        raise ComposeError(f"{where}: ports are 1 to 65535")
    return Port(numbers[-1], numbers[0] if len(numbers) == 2 else None, protocol)


def _mount(value: Any, volumes: set[str], where: str) -> Mount:
    if not isinstance(value, str):
        raise ComposeError(f"{where}: NAME:/path[:ro] (the long syntax is not supported)")
    parts = value.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise ComposeError(f"{where}: NAME:/path[:ro]")
    source, target = parts[0], parts[1]
    if source.startswith((".", "/", "~")):
        raise ComposeError(
            f"{where}: bind mounts are not supported (a host path differs from host to host); use a named volume"
        )
    if source not in volumes:
        raise ComposeError(f"{where}: the volume {source!r} is not declared under the top-level volumes")
    if not target.startswith("/"):
        raise ComposeError(f"{where}: the path in the container must be absolute")
    return Mount(source, target, len(parts) == 3 and parts[2] == "ro")


def duration(value: Any, where: str) -> float:
    """Compose durations: ``30s``, ``1m30s``, ``1h``, ``500ms``; a bare number is seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.fullmatch(str(value).strip())
    if not match or not any(match.groups()):
        raise ComposeError(f"{where}: a duration such as 30s, 1m30s or 500ms")
    h, m, s, ms = (float(g) if g else 0.0 for g in match.groups())
    return h * 3600 + m * 60 + s + ms / 1000


def _healthcheck(value: Any, where: str) -> Healthcheck | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ComposeError(f"{where}: a mapping")
    _only(value, {"test", "interval", "timeout", "retries", "start_period", "disable"}, f"{where}.")
    if value.get("disable") is True:
        return Healthcheck(("NONE",))
    test = value.get("test")
    if isinstance(test, str):
        test_args: tuple[str, ...] = ("CMD-SHELL", test)
    elif isinstance(test, list) and test and all(isinstance(t, str) for t in test):
        test_args = tuple(test)
        if test_args[0] not in ("CMD", "CMD-SHELL", "NONE"):
            raise ComposeError(f"{where}.test: a list starts with CMD, CMD-SHELL or NONE")
    else:
        raise ComposeError(f"{where}.test: a command (a string, or a list from CMD or CMD-SHELL)")
    retries = value.get("retries", 3)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 1:
        raise ComposeError(f"{where}.retries: a whole number from 1")
    return Healthcheck(
        test_args,
        duration(value.get("interval", "30s"), f"{where}.interval"),
        duration(value.get("timeout", "30s"), f"{where}.timeout"),
        retries,
        duration(value.get("start_period", "0s"), f"{where}.start_period"),
    )


def _constraints(value: Any, where: str) -> tuple[Constraint, ...]:
    if not isinstance(value, dict):
        raise ComposeError(f"{where}: a mapping")
    _only(value, {"constraints"}, f"{where}.")
    out = []
    for i, text in enumerate(_list(value.get("constraints"), f"{where}.constraints")):
        match = _CONSTRAINT.fullmatch(str(text))
        if not match:
            raise ComposeError(
                f"{where}.constraints[{i}]: node.labels.KEY == VALUE, node.hostname == NAME or node.id == ID "
                "(!= too); node.role and engine labels are not supported"
            )
        key = f"labels.{match[2]}" if match[2] else match[1]
        out.append(Constraint(key, match[3] == "==", match[4]))
    return tuple(out)


def _resources(value: Any, where: str) -> tuple[float, int, float, int]:
    if not isinstance(value, dict):
        raise ComposeError(f"{where[:-1]}: a mapping")
    _only(value, {"reservations", "limits"}, where)
    got = []
    for part in ("reservations", "limits"):
        section = value.get(part) or {}
        if not isinstance(section, dict):
            raise ComposeError(f"{where}{part}: a mapping")
        _only(section, {"cpus", "memory"}, f"{where}{part}.")
        try:
            cpus = float(section.get("cpus", 0))
        except (TypeError, ValueError):
            raise ComposeError(f"{where}{part}.cpus: a number, e.g. 0.5") from None
        got += [cpus, _bytes(section.get("memory", 0), f"{where}{part}.memory")]
    return got[0], int(got[1]), got[2], int(got[3])


def _bytes(value: Any, where: str) -> int:
    """Compose's sizes: ``512m``, ``1g``, ``100k``, ``1024b`` (binary units), or a number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.fullmatch(str(value).strip())
    if not match:
        raise ComposeError(f"{where}: a size such as 512m or 1g")
    return int(float(match[1]) * {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match[2].lower()])

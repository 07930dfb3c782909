"""What both engine clients share, free of any HTTP library: where the engine is, which API version to speak,
what its answers mean, and errors people can act on.

``DOCKER_HOST`` (``unix://`` or ``tcp://``; default ``unix:///var/run/docker.sock``), else the docker context
(``DOCKER_CONTEXT`` or ``currentContext`` in ``config.json``). The API version is negotiated: we ask
``/info`` unversioned, read the engine's version from the ``Api-Version`` header every answer of it carries
(``/version`` only where that header is missing), and speak the lower of the engine's version and ours,
never below 1.24 (Docker 1.12);
``DOCKER_API_VERSION`` pins one, as it does for the docker CLI. The clients: :mod:`dao.engine.client`
(aiohttp, every call) and :mod:`dao.engine.wire` (the standard library, the engine's own pull only).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from dao.errors import DaoError
from dao.paths import docker_config_dir

DEFAULT_HOST = "unix:///var/run/docker.sock"
OUR_API = (1, 43)
MIN_API = (1, 24)


class EngineError(DaoError):
    """The engine is unreachable, refused us, or answered an error; the message is for people.

    ``status`` is the engine's HTTP status when it answered (404 gone, 409 conflict/in use), else None.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class EngineInfo:
    api_version: str
    os: str  # Go names: linux
    arch: str  # amd64, arm64
    mirrors: tuple[str, ...]  # Docker Hub mirrors the engine is configured with
    containerd_store: bool  # images in containerd's store (snapshotters), not the classic graph drivers
    root_dir: str = ""  # DockerRootDir: the data root, as the engine's host sees it
    driver: str = ""  # the storage driver: overlay2, ...
    registry_config: dict[str, Any] | None = None  # /info's RegistryConfig: insecure registries, mirrors
    server_version: str = ""  # the engine's own version (Docker 26.1.5)


def _parse_version(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


def resolve_host() -> str:
    """Where the docker CLI would connect: ``DOCKER_HOST``, else the context (``DOCKER_CONTEXT``, else the
    config's ``currentContext``), else the default socket."""
    if os.environ.get("DOCKER_HOST"):
        return os.environ["DOCKER_HOST"]
    name = os.environ.get("DOCKER_CONTEXT")
    config_dir = docker_config_dir()
    if not name:
        try:
            name = json.loads((config_dir / "config.json").read_text()).get("currentContext")
        except (OSError, ValueError, AttributeError):
            name = None
    if not name or name == "default":
        return DEFAULT_HOST
    meta = config_dir / "contexts" / "meta" / hashlib.sha256(name.encode()).hexdigest() / "meta.json"
    try:
        host = json.loads(meta.read_text())["Endpoints"]["docker"]["Host"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EngineError(f"docker context {name!r} not found or unreadable ({meta})") from exc
    return str(host)


def tls_wanted(scheme: str) -> bool:
    """TCP with TLS: ``https://``, or ``DOCKER_TLS_VERIFY`` set, as for the docker CLI."""
    return scheme == "https" or os.environ.get("DOCKER_TLS_VERIFY") not in (None, "", "0")


def choose_version(doc: dict[str, Any]) -> str:
    """The path prefix (``v1.43``) to speak, from the unversioned ``/version`` answer."""
    engine = _parse_version(str(doc.get("ApiVersion", "1.24")))
    if engine < MIN_API:
        raise EngineError(f"the Docker engine speaks API {doc.get('ApiVersion')}; dao needs 1.24 or newer")
    chosen = min(engine, OUR_API)
    pinned = os.environ.get("DOCKER_API_VERSION")  # as the docker CLI: speak exactly this version
    if pinned:
        try:
            chosen = _parse_version(pinned.removeprefix("v"))
        except ValueError:
            raise EngineError(f"DOCKER_API_VERSION={pinned!r}: give a version like 1.41") from None
        if not MIN_API <= chosen <= engine:
            raise EngineError(f"DOCKER_API_VERSION={pinned}: this engine speaks 1.24 to {doc.get('ApiVersion')}")
    return f"v{chosen[0]}.{chosen[1]}"


def version_of_info(api_version: str | None, info: Any) -> dict[str, Any] | None:
    """What dao reads of ``/version``, from the unversioned ``/info`` answer and its ``Api-Version`` header:
    one request to the engine instead of two (each is ~5 ms of dockerd's time, on a command whose start is
    most of what dao adds to a pull from a near mirror). None without the header: then ask ``/version``."""
    if not api_version or not isinstance(info, dict):
        return None
    return {
        "ApiVersion": api_version,
        "Os": info.get("OSType") or "linux",
        "Arch": info.get("Architecture") or "amd64",  # uname's names here; /version's are Go's (go_arch)
        "Version": info.get("ServerVersion") or "",
    }


def engine_info(version: str, doc: dict[str, Any], info: dict[str, Any]) -> EngineInfo:
    """What dao needs of ``/version`` (``doc``) and ``/info``."""
    registry = info.get("RegistryConfig") or {}
    mirrors = tuple(str(m).rstrip("/") for m in registry.get("Mirrors") or [])
    status = info.get("DriverStatus") or []
    containerd_store = any("io.containerd.snapshotter" in str(value) for _, value in status)
    return EngineInfo(
        version.removeprefix("v"),
        str(doc.get("Os", "linux")),
        go_arch(str(doc.get("Arch", "amd64"))),
        mirrors,
        containerd_store,
        str(info.get("DockerRootDir") or ""),
        str(info.get("Driver") or ""),
        registry if isinstance(registry, dict) else None,
        str(doc.get("Version") or ""),
    )


def stream_document(line: bytes) -> dict[str, Any] | None:
    """One line of a newline-delimited JSON answer (a pull's progress, the event stream): its object, or
    None for anything else (a blank or torn line)."""
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def pull_params(image: str, tag: str, platform: str | None) -> dict[str, str]:
    """The query of ``POST /images/create`` for the engine's own pull."""
    params = {"fromImage": image, "tag": tag}
    if platform:
        params["platform"] = platform
    return params


def checked_pull_message(doc: dict[str, Any]) -> dict[str, Any]:
    """A progress message of the engine's pull, or the error it ends with raised."""
    if doc.get("error") or doc.get("errorDetail"):
        detail = doc.get("errorDetail") or {}
        raise EngineError(f"the engine's pull failed: {doc.get('error') or detail.get('message')}")
    return doc


def unreachable(host: str, exc: Exception) -> EngineError:
    cause = exc.__cause__ or exc
    if isinstance(cause, PermissionError) or "Permission denied" in str(exc):
        return EngineError(f"permission denied on {host}: run with sudo, or join the docker group (then log in again)")
    return EngineError(f"cannot reach the Docker engine at {host}: is dockerd running? ({exc})")


def message_of(text: str) -> str:
    """The engine's error message from its JSON answer (or the start of whatever it said)."""
    try:
        doc = json.loads(text)
        return str(doc.get("message", text)).strip()
    except (ValueError, AttributeError):
        return text.strip()[:300]


def go_arch(arch: str) -> str:
    """Go's name (as in image platforms) for an architecture named the way uname names it."""
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm", "i686": "386"}.get(arch, arch)
